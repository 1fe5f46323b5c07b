"""Shared plumbing: project data files, devices, seeds, atomic writes, image datasets."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

import numpy as np
import torch

from diffusion_from_scratch.cli import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- data files
def load_prompts(path: Path = DATA_DIR / "prompts.json") -> dict[str, str]:
    """class -> Stable Diffusion prompt, checked: a non-empty JSON object of non-empty strings."""
    prompts = _load_json(path)
    if not isinstance(prompts, dict) or not prompts:
        raise InputError(f"{path}: expected a non-empty JSON object mapping class -> prompt")
    for name, prompt in prompts.items():
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{path}: class {name!r} needs a non-empty prompt string")
    return prompts


def load_class_words(path: Path = DATA_DIR / "class_words.json") -> dict[str, list[str]]:
    """class -> the words its images are trained with (one optimizer step per word)."""
    mapping = _load_json(path)
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"{path}: expected a non-empty JSON object mapping class -> list of words")
    for name, words in mapping.items():
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise InputError(f"{path}: class {name!r} needs a non-empty list of words")
    return mapping


def load_word_list(path: Path) -> list[str]:
    """One word or phrase per line; blank lines and '#' comments are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise InputError(f"cannot read word list {path}: {error.strerror}") from None
    words = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not words:
        raise InputError(f"{path}: the word list is empty")
    return words


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
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


# ----------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
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
def load_split(root: Path, split: str, class_names: list[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``<root>/<split>/<class>/*`` as uint8 (N, 3, S, S) plus class indices (N,).

    Class folders must match ``class_names`` exactly (``data/class_words.json``): a missing,
    extra or empty class folder, or an image that does not decode, raises InputError naming it.
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
                with Image.open(path) as image:
                    image = image.convert("RGB")
            except (OSError, UnidentifiedImageError, SyntaxError):
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
