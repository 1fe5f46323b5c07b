"""Shared plumbing: project data files, devices, seeds, atomic writes, image datasets."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

import numpy as np
import torch

from bias_begets_bias.cli import InputError, require

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_TEXT_FILE_BYTES = 1 << 30  # settings, word lists and tables larger than this are refused, not read into memory


# ----------------------------------------------------------------------------- data files
def load_prompts(path: Path = DATA_DIR / "prompts.json") -> dict[str, str]:
    """class -> Stable Diffusion prompt, checked: a non-empty JSON object of non-empty strings."""
    prompts = load_json(path)
    if not isinstance(prompts, dict) or not prompts:
        raise InputError(f"{path}: expected a non-empty JSON object mapping class -> prompt")
    for name, prompt in prompts.items():
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{path}: class {name!r} needs a non-empty prompt string")
    return prompts


def load_class_words(path: Path = DATA_DIR / "class_words.json") -> dict[str, list[str]]:
    """class -> the words its images are trained with (one optimizer step per word)."""
    mapping = load_json(path)
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"{path}: expected a non-empty JSON object mapping class -> list of words")
    for name, words in mapping.items():
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise InputError(f"{path}: class {name!r} needs a non-empty list of words")
    return mapping


def read_text_file(path: Path, what: str, limit: int | None = None) -> str:
    """A UTF-8 text file's content; a missing, unreadable, non-UTF-8 or (with ``limit`` bytes)
    absurdly large file raises InputError naming it and ``what`` was expected."""
    path = Path(path)
    limit = MAX_TEXT_FILE_BYTES if limit is None else limit
    try:
        size = path.stat().st_size
        if size > limit:
            raise InputError(f"{path}: {human_bytes(size)} is too large for {what} (at most {human_bytes(limit)})")
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: expected {what} in UTF-8 text, but byte {error.start} is not UTF-8") from None


def read_csv_table(path: Path, columns: Sequence[str] = (), missing_ok: bool = False) -> list[dict]:
    """The rows of a CSV table one of the scripts wrote (dicts keyed by its header); [] when
    ``missing_ok`` and nothing is at ``path``. An unreadable file, one without ``columns``, or a
    row with more cells than the header raises InputError naming it."""
    if missing_ok and not Path(path).exists():
        return []
    try:
        rows = list(csv.DictReader(io.StringIO(read_text_file(path, "a CSV table"), newline="")))
    except csv.Error as error:
        raise InputError(f"{path}: not a readable CSV table ({error}); rerun the script that wrote it") from None
    if any(None in row for row in rows):  # DictReader files surplus cells under the key None
        raise InputError(f"{path}: a row has more cells than the header; rerun the script that wrote it")
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise InputError(f"{path}: expected the columns {', '.join(columns)} (missing {', '.join(missing)})")
    return rows


def load_word_list(path: Path) -> list[str]:
    """One word or phrase per line; blank lines and '#' comments are ignored."""
    lines = read_text_file(path, "a word list").splitlines()
    words = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not words:
        raise InputError(f"{path}: the word list is empty")
    return words


def load_json(path: Path) -> Any:
    """A JSON file's content; a missing, unreadable, malformed or absurdly large file raises
    InputError naming it."""
    text = read_text_file(path, "a JSON file")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{path}: invalid JSON ({error})") from None


def training_vocabulary(class_words: dict[str, list[str]]) -> list[str]:
    """The distinct training words in first-seen order (fixes the conditioning table's rows)."""
    return list(dict.fromkeys(word for words in class_words.values() for word in words))


# ----------------------------------------------------------------------------- devices, seeds
def resolve_device(name: str = "") -> torch.device:
    """``name`` if given, else the current accelerator when one is available, else the CPU."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(f"--device: unknown device {name!r}") from None
        if device.type != "cpu" and not (torch.accelerator.is_available()
                                         and torch.accelerator.current_accelerator().type == device.type):
            raise InputError(f"--device: {name!r} is not available on this machine")
        return device
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def derived_seed(base_seed: int, *keys: int | str) -> int:
    """A 31-bit seed that depends on the base seed and the keys (stable across machines)."""
    material = [base_seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence(material).generate_state(1)[0] & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- room for a request
def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def available_memory() -> int | None:
    """Bytes a new allocation can get: MemAvailable of /proc/meminfo (Linux), else free pages x
    page size (os.sysconf); None when neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(nbytes: float, what: str) -> None:
    """InputError before any work when ``what`` needs more memory than is available now."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise InputError(f"{what}: needs about {human_bytes(nbytes)} of memory, more than the {human_bytes(available)} "
                         f"available; ask for less")


def free_disk(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent); None
    when unknown (a pseudo file system such as /proc or /sys reports no blocks at all)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                if hasattr(os, "statvfs") and os.statvfs(candidate).f_blocks == 0:
                    return None
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def require_disk(path: Path, nbytes: float, what: str) -> None:
    """InputError before anything is written when ``what`` needs more disk than ``path`` has free."""
    free = free_disk(path)
    if free is not None and nbytes > free:
        raise InputError(f"{what}: needs about {human_bytes(nbytes)} of disk in {path}, more than the "
                         f"{human_bytes(free)} free; ask for less or choose another folder")


def cpu_name() -> str:
    """The CPU model as Linux's /proc/cpuinfo names it, else what the platform says (for records)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def require_writable(path: Path, flag: str) -> None:
    """Check, without creating anything, that the folder ``path`` exists or can be created and
    written: its nearest existing part must be a folder this process may write to."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "it is a file" if candidate == path else f"{candidate} is a file"
                raise InputError(f"--{flag}: cannot write to {path}: {what}, not a folder")
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise InputError(f"--{flag}: cannot write to {path}: {candidate} is not writable")
            return


def writable_folder(path: Path, flag: str) -> Path:
    """Create the folder ``path`` (and its parents) and check that a file can be written in it;
    a path under a file, a file itself, or a read-only place raises InputError naming ``flag``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        if path.exists() and not path.is_dir():
            reason = "it is a file, not a folder"
        elif any(parent.exists() and not parent.is_dir() for parent in path.parents):
            reason = "a part of the path is a file, not a folder"
        raise InputError(f"--{flag}: cannot write to {path}: {reason}") from None
    return path


# ----------------------------------------------------------------------------- atomic writes
def current_umask() -> int:
    """The process's file-mode creation mask (read from /proc where it can be, so that no
    other thread ever sees a changed umask; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    The file ends up with the mode a plain ``open(path, "wb")`` gives, 0o666 & ~umask
    (mkstemp alone creates it 0o600, which colleagues sharing a dataset cannot read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_orphaned_temporaries(root: Path) -> int:
    """Delete temporary files left by killed writers (their pid, in the name, is not running)."""
    removed = 0
    for tmp in Path(root).rglob(".*.tmp"):
        try:
            pid = int(tmp.name.split(".")[-3])
            os.kill(pid, 0)
            continue  # its writer is still running (another shard)
        except (ValueError, IndexError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def plain_csv_value(value: Any) -> Any:
    """None becomes an empty cell; everything else as csv writes it."""
    return "" if value is None else value


def compact_csv_value(value: Any) -> Any:
    """Floats with 6 significant digits (NaN -> empty), sequences joined with ';'."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return ";".join(str(v) for v in value)
    return plain_csv_value(value)


def csv_text(rows: Iterable[dict], columns: Sequence[str], format_value=plain_csv_value) -> str:
    """CSV text of ``rows`` with the given columns in order (missing keys -> empty cells)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: format_value(row.get(key, "")) for key in columns})
    return buffer.getvalue()


def compact_csv_text(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """``csv_text`` with compact numbers (for report tables)."""
    return csv_text(rows, columns, compact_csv_value)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


# ----------------------------------------------------------------------------- image datasets
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit greyscale modes
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")  # formats whose 32-bit "I" mode holds 16-bit values (0..65535)


def to_rgb8(image, path: Path | str):
    """A Pillow image of any mode as 8-bit RGB, or InputError naming ``path``.

    16-bit greyscale (modes I;16*, and mode I from PNG or PGM, whose values span
    0..65535) maps v -> round(v * 255 / 65535); Pillow's own ``convert("RGB")`` clips
    those values at 255 and makes the image white. 16-bit RGB(A) PNGs already open as 8-bit
    (Pillow keeps each sample's high byte, floor(v / 256)). Palette, greyscale, CMYK, YCbCr and alpha modes use Pillow's conversion (alpha is
    dropped, as torchvision's loader does). Mode I from other formats (32-bit integers)
    and mode F (floats) have no defined intensity range and are refused.
    """
    from PIL import Image

    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and image.format in SIXTEEN_BIT_I_FORMATS):
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise InputError(f"{path}: 16-bit image with values outside 0..65535 (mode {mode})")
        return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("I", "F"):
        raise InputError(f"{path}: mode {mode} ({'32-bit integer' if mode == 'I' else 'floating-point'} pixels) "
                         f"has no defined intensity range; save it as an 8- or 16-bit PNG")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise InputError(f"{path}: cannot convert mode {mode} to RGB ({error}); save it as an RGB PNG") from None


def load_split(root: Path, split: str, class_names: list[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``<root>/<split>/<class>/*`` as uint8 (N, 3, S, S) plus class indices (N,).

    Class folders must match ``class_names`` exactly (``data/class_words.json``): a missing,
    extra or empty class folder, or an image that does not decode, raises InputError naming it.
    Images of any mode or bit depth become 8-bit RGB through ``to_rgb8``.
    """
    from PIL import Image, UnidentifiedImageError

    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise InputError(f"--dataset_path: {split_dir} does not exist; expected <dataset>/{{train,test}}/<class>/*.png "
                         f"(e.g. data/generated/portraits/32 from synthetic_data.py)")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    missing, extra = sorted(set(class_names) - set(found)), sorted(set(found) - set(class_names))
    if missing or extra:
        raise InputError(f"--dataset_path: class folders in {split_dir} do not match data/class_words.json "
                         f"(missing: {missing or 'none'}, unexpected: {extra or 'none'})")
    images, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"--dataset_path: class folder {split_dir / name} has no images")
        for path in files:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(path) as opened:
                        opened.load()
                        image = to_rgb8(opened, path)
                        if image is opened:
                            image = opened.copy()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise InputError(f"{path}: the image claims an enormous size; refusing to decode it") from None
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
                raise InputError(f"corrupt or unreadable image: {path}") from None
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
            images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def save_image_grid(images: torch.Tensor, path: Path, nrow: int, labels: list[str] | None = None) -> None:
    """uint8 (N, 3, H, W) images as one PNG grid (rows of ``nrow``), written atomically."""
    import io

    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    label_w = 90 if labels else 0
    grid = np.full((rows * (h + 2), label_w + nrow * (w + 2), 3), 255, dtype=np.uint8)
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * (h + 2):r * (h + 2) + h, label_w + c * (w + 2):label_w + c * (w + 2) + w] = array[i]
    picture = Image.fromarray(grid)
    if labels:
        draw = ImageDraw.Draw(picture)
        for r, text in enumerate(labels[:rows]):
            draw.text((2, r * (h + 2) + h // 2 - 5), text[:14], fill=(0, 0, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar that redraws at most every 30 s when stderr is not a terminal, so that logs
    of long runs (nohup, CI) stay readable; interactive use keeps tqdm's defaults."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("maxinterval", max(30.0, kwargs["mininterval"]))  # tqdm's monitor redraws after this
    return tqdm(iterable, **kwargs)


# ----------------------------------------------------------------------------- recorded paths
def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex), so a record can say which content a path held."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(path: Path | str, base: Path | str | None = None) -> str:
    """``path`` as records hold it: relative to the repository root when it lies inside it
    ("data/professions.txt"), else relative to ``base`` (a run folder) when it lies inside that
    ("audit"), else absolute. A path outside both is not made relative: "../../data/32" breaks
    as soon as the run folder moves without its data, which an absolute path survives; a kept
    copy of a run (statistical_auditing/keep_run.py) writes such paths portably."""
    resolved = Path(path).expanduser().resolve()
    for root in (REPO_ROOT, Path(base).expanduser().resolve() if base is not None else None):
        if root is not None and (resolved == root or root in resolved.parents):
            return resolved.relative_to(root).as_posix() or "."
    return str(resolved)


def resolve_recorded_path(text: str, base: Path | str | None = None, sha256: str | None = None) -> Path:
    """Where a path recorded by ``record_path`` (or an older absolute one) is on this machine.

    A relative path is looked up under the repository root, then under ``base`` (the run
    folder). An absolute path that does not exist here (recorded on another machine) falls back
    to the same place under this repository's data/ (the part after its last "data" component,
    then the same-named file directly in data/), accepted when ``sha256`` matches its content
    or no hash was recorded. When nothing fits, the path as given is returned, so that the caller
    names it in its error.
    """
    path = Path(text).expanduser()
    if not path.is_absolute():
        for root in (REPO_ROOT, Path(base) if base is not None else None, Path.cwd()):
            if root is not None and (root / path).exists():
                return root / path
        return REPO_ROOT / path
    if path.exists():
        return path
    parts = path.parts
    candidates = []
    if "data" in parts:
        last = len(parts) - 1 - parts[::-1].index("data")
        candidates.append(REPO_ROOT.joinpath(*parts[last:]))
    candidates.append(DATA_DIR / path.name)
    for candidate in candidates:
        if candidate.exists() and (sha256 is None or (candidate.is_file() and file_sha256(candidate) == sha256)):
            return candidate
    return path


# ----------------------------------------------------------------------------- output folder ownership
OWNER_FILE = ".owner.json"  # {"tool": ..., "run": ...} in every output folder of the auditing scripts
# A file each tool writes into its folder, to recognise folders made before the marker existed.
TOOL_SIGNATURES = {"audit": "audit.json", "lipschitz": "lipschitz.json", "dose_response": "dose_response.json",
                   "fidelity": "fidelity.md"}



def resolve_dataset(run_config: dict, override: str, run_dir: Path | None = None) -> Path:
    """The run's ``<root>/<size>`` dataset folder: --dataset_path as given, else the run's
    recorded dataset_path (relative to the repository, else to the run folder; an older run's
    absolute path from another machine falls back to the same place under data/:
    ``utils.resolve_recorded_path``)."""
    text = override or run_config.get("dataset_path", "")
    require(bool(text), "the run's config.json has no dataset_path; pass --dataset_path")
    path = Path(text).expanduser()
    for candidate in ((path,) if override else ()) + (resolve_recorded_path(text, run_dir),):
        if candidate.is_dir():
            return candidate
    flag = "--dataset_path" if override else "the run's dataset_path"
    raise InputError(f"{flag}: dataset folder {text} does not exist (expected <root>/<size>/test/<class>/*.png); "
                     f"pass --dataset_path")


def dataset_source(dataset: Path) -> str | None:
    """``source`` in ``<dataset root>/dataset.json`` (procedural / stable-diffusion), None if unknown."""
    path = dataset.parent / "dataset.json"
    if not path.exists():
        return None
    settings = load_json(path)
    if not isinstance(settings, dict):
        raise InputError(f"{path}: expected a JSON object of the dataset's settings (synthetic_data.py writes it)")
    return settings.get("source")


def run_identity(run_dir: Path, config: dict) -> str:
    """A run's id for ownership markers: its folder name and the start of the sha256 of its
    conditioning (a JL seed and arm), which a copy or an exported folder of the run keeps."""
    return f"{Path(run_dir).resolve().name}@{str(config.get('conditioning_sha256', ''))[:12]}"


def is_run_folder(path: Path) -> bool:
    """A training run (config.json + conditioning.safetensors) or a kept copy of one."""
    return (path / "config.json").is_file() and (path / "conditioning.safetensors").is_file()


def enclosing_run(path: Path) -> Path | None:
    """The run folder ``path`` is or lies in (resolved), else None."""
    resolved = Path(path).expanduser().resolve()
    for candidate in (resolved, *resolved.parents):
        if is_run_folder(candidate):
            return candidate
    return None


def check_output_folder(out: Path, tool: str, run_dir: Path, run_id: str, default: Path, flag: str = "out") -> None:
    """Refuse, before anything is written, an output folder that is not this tool's for this run.

    Refused: a run folder itself; a folder inside another run's folder; a folder whose owner
    marker (OWNER_FILE) names another tool, or another run when it lies outside this run; a
    non-empty folder without a marker that holds another tool's output, or that lies inside this
    run but is not this tool's default place (``default``, the folder reruns write to, which
    is this tool's own even when made before the markers existed). Nothing is written here.
    """
    out_path = Path(out).expanduser()
    resolved, own_run = out_path.resolve(), Path(run_dir).resolve()
    inside = enclosing_run(out_path)
    if inside == resolved:
        raise InputError(f"--{flag}: {out_path} is a run folder; {tool} writes into a folder of its own")
    if inside is not None and inside != own_run:
        raise InputError(f"--{flag}: {out_path} lies inside the run folder {inside}, not this {tool}'s --run "
                         f"{run_dir}; choose a folder of this run or outside any run")
    if not resolved.is_dir() or not any(resolved.iterdir()):
        return
    marker_path = resolved / OWNER_FILE
    if marker_path.is_file():
        marker = load_json(marker_path)
        if not isinstance(marker, dict):
            raise InputError(f"{marker_path}: expected a JSON object with the keys tool and run")
        if marker.get("tool") != tool or (inside is None and marker.get("run") != run_id):
            raise InputError(f"--{flag}: {out_path} holds the output of {marker.get('tool')} for run "
                             f"{marker.get('run')} (its {OWNER_FILE}), not of {tool} for {run_id}; choose "
                             f"another folder")
        return
    if resolved == Path(default).expanduser().resolve():
        return
    foreign = [name for other, name in TOOL_SIGNATURES.items() if other != tool and (resolved / name).exists()]
    if foreign:
        raise InputError(f"--{flag}: {out_path} holds another tool's output ({', '.join(foreign)}); choose "
                         f"another folder")
    if inside is not None:
        raise InputError(f"--{flag}: {out_path} is a non-empty folder of the run {run_dir} that {tool} did not "
                         f"make (no {OWNER_FILE}); choose an empty or new folder")


def claim_output_folder(out: Path, tool: str, run_dir: Path, run_id: str, default: Path,
                        flag: str = "out") -> Path:
    """``check_output_folder``, then create the folder (``writable_folder``) and mark it as
    this tool's output for this run. Call it only after every input check, just before the
    first write, so that refused input leaves no marker behind."""
    check_output_folder(out, tool, run_dir, run_id, default, flag)
    out = writable_folder(Path(out), flag)
    marker = {"tool": tool, "run": run_id}
    marker_path = out / OWNER_FILE
    if not marker_path.is_file() or load_json(marker_path) != marker:
        atomic_write_json(marker_path, marker)
    return out


def claim_analysis_folder(out: Path, tool: str, flag: str = "out") -> Path:
    """The output folder of an analysis over many runs (no run of its own): refused when it is or
    lies in a run folder, or is a non-empty folder whose OWNER_FILE names another tool or that has
    none; then created and marked as ``tool``'s. Call it after every input check."""
    out_path = Path(out).expanduser()
    inside = enclosing_run(out_path)
    if inside is not None:
        raise InputError(f"--{flag}: {out_path} is or lies in the run folder {inside}; {tool} writes outside runs")
    resolved = out_path.resolve()
    if resolved.is_dir() and any(resolved.iterdir()):
        marker = load_json(resolved / OWNER_FILE) if (resolved / OWNER_FILE).is_file() else None
        if not isinstance(marker, dict) or marker.get("tool") != tool:
            owner = f"the output of {marker.get('tool')!r}" if isinstance(marker, dict) else f"no {OWNER_FILE}"
            raise InputError(f"--{flag}: {out_path} is a non-empty folder that is not {tool}'s ({owner}); choose "
                             f"an empty or new folder")
    out_path = writable_folder(out_path, flag)
    if not (out_path / OWNER_FILE).is_file():
        atomic_write_json(out_path / OWNER_FILE, {"tool": tool})
    return out_path


def recorded_flags(cfg: dict, run_dir: Path, path_keys: Sequence[str] = ("run", "out", "words_file", "dataset_path")
                   ) -> dict:
    """A script's flags as its records (audit.json and the like) hold them: the path flags in
    ``path_keys`` through ``record_path`` (the run itself relative to the repository, else by its
    folder name; the others relative to the repository, else to the run folder), plus
    ``words_file_sha256`` when a word list was read, so a later step can check its content."""
    record = dict(cfg)
    run_dir = Path(run_dir)
    for key in path_keys:
        if record.get(key):
            record[key] = record_path(record[key], run_dir.parent if key == "run" else run_dir)
    if cfg.get("words_file") and not cfg.get("words") and Path(cfg["words_file"]).is_file():
        record["words_file_sha256"] = file_sha256(Path(cfg["words_file"]))
    return record
