"""Labelled images from several sources behind one iterator, for audits with known answers.

Every source is a ``LabelledImages``: iterating yields ``(image_id, image, label)`` with a
PIL RGB image and a label string from ``classes``. Sources:

- ``HuggingFaceImages``: a Hugging Face dataset, by Hub id (``HuggingFaceM4/FairFace``,
  configs "0.25" / "1.25"; CIFAR-10-style datasets with any image and label column) or a
  folder written by ``save_to_disk``; integer labels are mapped through the column's
  ClassLabel names, other labels are used as strings;
- ``FairFaceCSV``: the original FairFace release, a label CSV with columns
  ``file,age,gender,race,service_test`` whose ``file`` paths are relative to an image folder;
- ``CSVImages``: any image folder plus a CSV with a file column and a label column;
- ``SixClassImages``: the project's six-class dataset, ``<root>/<size>/<split>/<class>/*.png``,
  labelled by class, or by gender through the class's words in data/class_words.json.

Gender labels are normalised to lower case ("male", "female") in every source so that one
prompt map serves all of them. Images are resized (shorter side, bicubic) and centre-cropped
to a square of ``resize`` pixels (0 keeps them as they are). An image that cannot be read is
an InputError naming it, or, with ``skip_bad=True``, skipped with a note on stderr and
recorded in ``skipped``.
"""
from __future__ import annotations

import abc
import csv
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from bias_begets_bias.cli import InputError
from bias_begets_bias.hub import looks_like_path
from bias_begets_bias.utils import DATA_DIR, load_class_words, read_text_file, to_rgb8

CLASS_WORDS = DATA_DIR / "class_words.json"
FAIRFACE_HUB_ID = "HuggingFaceM4/FairFace"
FAIRFACE_COLUMNS = ("file", "age", "gender", "race", "service_test")
FAIRFACE_RACES = ("East Asian", "Indian", "Black", "White", "Middle Eastern", "Latino_Hispanic", "Southeast Asian")
GENDERS = ("male", "female")
KINDS = ("auto", "hf", "fairface_csv", "csv", "sixclass")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to size x size."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def images_to_tensor(images: list[Image.Image]) -> Any:
    """Same-size RGB PIL images -> a float32 (B, 3, H, W) tensor in [0, 1] (what
    ``ScoreModel.encode`` takes)."""
    import numpy as np
    import torch

    if not images:
        raise InputError("no images to stack")
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise InputError(f"images of different sizes {sorted(sizes)} cannot form one batch; set a resize")
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


class UnreadableImage(InputError):
    """An image file or record that PIL cannot decode; ``reason`` says why."""

    def __init__(self, image_id: str, reason: str):
        super().__init__(f"cannot read image {image_id}: {reason} (fix or remove it, or skip unreadable "
                         f"images with skip_bad / --skip_bad true)")
        self.image_id, self.reason = image_id, reason


def _opened(source: Any) -> Any:
    """What ``Image.open`` takes for a path, bytes, or a ``datasets`` Image(decode=False) value."""
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        source = io.BytesIO(data) if data else path
        if source is None:
            raise OSError("the record holds neither image bytes nor a path")
    elif isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    return source


def check_header(image_id: str, source: Any) -> None:
    """Read only the image's header (cheap): an unreadable file, or one claiming more pixels than
    Pillow's decompression-bomb limit, raises UnreadableImage before any work is done on it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_opened(source)):
                pass
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(image_id, f"the image claims an enormous size ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise UnreadableImage(image_id, f"{type(error).__name__}: {error}") from None


def decode_image(image_id: str, source: Any) -> Image.Image:
    """An 8-bit RGB PIL image from a path, bytes, or a ``datasets`` Image(decode=False) value
    (any mode or bit depth through ``utils.to_rgb8``). An image whose header claims more pixels
    than Pillow's decompression-bomb limit is refused before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_opened(source)) as opened:
                opened.load()
                image = to_rgb8(opened, image_id)
                return opened.copy() if image is opened else image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(image_id, f"the image claims an enormous size ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise UnreadableImage(image_id, f"{type(error).__name__}: {error}") from None
    except InputError as error:  # a mode without a defined intensity range (to_rgb8)
        raise UnreadableImage(image_id, str(error)) from None


class LabelledImages(abc.ABC):
    """An iterable of (image_id, PIL RGB image, label); ``classes`` lists the label set.

    Subclasses provide ``records``: (image_id, source, label) with source a path, bytes,
    or a ``datasets`` image dict ({"bytes", "path"}); decoding, resizing, the limit and
    the bad-image policy live here.
    """

    classes: list[str]

    def __init__(self, resize: int = 512, skip_bad: bool = False, limit: int | None = None):
        if resize < 0:
            raise InputError(f"--resize must be >= 0 (0 keeps the size), got {resize}")
        if limit is not None and limit < 0:
            raise InputError(f"--limit must be >= 0, got {limit}")
        self.resize = resize
        self.skip_bad = skip_bad
        self.limit = limit
        self.skipped: list[tuple[str, str]] = []

    @abc.abstractmethod
    def records(self) -> Iterator[tuple[str, Any, str]]:
        """(image id, undecoded source, label) of every record, in dataset order, without ``limit``."""

    @abc.abstractmethod
    def _count(self) -> int: ...

    def __len__(self) -> int:
        """Records available (before skipping bad images), capped by ``limit``."""
        n = self._count()
        return n if self.limit is None else min(n, self.limit)

    def decode(self, image_id: str, source: Any) -> Image.Image | None:
        """The record's image, resized; None when it is unreadable and ``skip_bad`` is set."""
        try:
            image = decode_image(image_id, source)
        except UnreadableImage as error:
            if not self.skip_bad:
                raise
            self.skipped.append((image_id, error.reason))
            print(f"note: skipped unreadable image {image_id}: {error.reason}", file=sys.stderr)
            return None
        return square_resize(image, self.resize) if self.resize else image

    def __iter__(self) -> Iterator[tuple[str, Image.Image, str]]:
        yielded = 0
        if self.limit == 0:
            return
        for image_id, source, label in self.records():
            image = self.decode(image_id, source)
            if image is None:
                continue
            yield image_id, image, label
            yielded += 1
            if self.limit is not None and yielded >= self.limit:
                return


def _normalise(attribute: str, value: Any) -> str:
    text = str(value).strip()
    return text.lower() if attribute == "gender" else text


def _ordered_classes(attribute: str, labels: set[str]) -> list[str]:
    """A fixed order for known attributes (FairFace's), sorted otherwise."""
    known = {"gender": GENDERS, "race": FAIRFACE_RACES}.get(attribute)
    if known and labels <= set(known):
        return list(known)
    return sorted(labels)


# ----------------------------------------------------------------------------- Hugging Face


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_hf_dataset(source: str, config: str | None, split: str, what: str = "dataset",
                    streaming: bool = False) -> Any:
    """A ``datasets.Dataset``: a ``save_to_disk`` folder (config ignored) or a Hub dataset
    (an ``IterableDataset`` read as it downloads when ``streaming``)."""
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        if not is_saved_dataset(path):
            raise InputError(f"{source} is not a dataset saved with save_to_disk "
                             f"(expected dataset_dict.json or state.json in it)")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise InputError(f"{source}: no split {split!r}; it has {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    if looks_like_path(source):
        raise InputError(f"no such dataset folder {source}")
    try:
        return datasets.load_dataset(source, config or None, split=split, streaming=streaming)
    except Exception as error:  # noqa: BLE001 -- any library failure becomes one clear message
        raise InputError(
            f"cannot load {what} {source!r} (config {config!r}, split {split!r}): {type(error).__name__}: "
            f"{str(error)[:200]}. Without network: on a machine with network run "
            f"`hf download --repo-type dataset {source}` and copy the Hugging Face cache here (HF_HOME), or "
            f"load it there and `save_to_disk` it to a folder, then pass that folder instead of the id") from error


class HuggingFaceImages(LabelledImages):
    """Images and one label column of a Hugging Face dataset (Hub id or save_to_disk folder)."""

    def __init__(self, source: str = FAIRFACE_HUB_ID, config: str | None = "0.25", split: str = "train",
                 attribute: str = "gender", image_column: str = "image", **options: Any):
        super().__init__(**options)
        import datasets

        self.source = source
        self.split = split
        dataset = load_hf_dataset(source, config, split)
        missing = [c for c in (image_column, attribute) if c not in dataset.column_names]
        if missing:
            raise InputError(f"dataset {source}: no column(s) {', '.join(missing)}; it has "
                             f"{', '.join(dataset.column_names)} (choose with --image_column / --label_column)")
        feature = dataset.features[attribute]
        self.attribute = attribute
        self.image_column = image_column
        # decode ourselves, so that an unreadable image is reported by id
        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        if isinstance(feature, datasets.ClassLabel):
            self._names = [_normalise(attribute, name) for name in feature.names]
            self.classes = list(self._names)
        else:
            self._names = None
            self.classes = _ordered_classes(attribute, {_normalise(attribute, v) for v in dataset[attribute]})

    def _count(self) -> int:
        return len(self.dataset)

    def records(self) -> Iterator[tuple[str, Any, str]]:
        for index, row in enumerate(self.dataset):
            value = row[self.attribute]
            label = self._names[value] if self._names is not None else _normalise(self.attribute, value)
            yield f"{self.split}/{index}", row[self.image_column], label


# ----------------------------------------------------------------------------- CSV sources


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not csv_path.is_file():
        raise InputError(f"no such label CSV {csv_path}")
    text = read_text_file(csv_path, "a label CSV")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except csv.Error as error:
        raise InputError(f"{csv_path}: not a readable label CSV ({error})") from None
    return [c.strip() for c in (reader.fieldnames or [])], rows


class CSVImages(LabelledImages):
    """An image folder plus a CSV naming each image (``file_column``) and its label."""

    def __init__(self, csv_path: str | Path, images_root: str | Path | None = None, label_column: str = "label",
                 file_column: str = "file", required: tuple[str, ...] = (), **options: Any):
        super().__init__(**options)
        self.csv_path = Path(csv_path).expanduser()
        columns, rows = _read_csv(self.csv_path)
        needed = list(dict.fromkeys((file_column, label_column) + tuple(required)))
        missing = [c for c in needed if c not in columns]
        if missing:
            raise InputError(f"{self.csv_path}: missing column(s) {', '.join(missing)} "
                             f"(expected {', '.join(needed)}; found {', '.join(columns) or 'none'})")
        self.images_root = Path(images_root).expanduser() if images_root else self.csv_path.parent
        if not self.images_root.is_dir():
            raise InputError(f"image folder {self.images_root} does not exist (the CSV's file paths are relative to it)")
        self.attribute = label_column
        self.rows = []
        for number, row in enumerate(rows, start=2):  # line 1 is the header
            file, label = (row.get(file_column) or "").strip(), _normalise(label_column, row.get(label_column) or "")
            if not file or not label:
                raise InputError(f"{self.csv_path} line {number}: empty {file_column!r} or {label_column!r}")
            self.rows.append((file, label))
        self.classes = _ordered_classes(label_column, {label for _, label in self.rows})

    def _count(self) -> int:
        return len(self.rows)

    def records(self) -> Iterator[tuple[str, Any, str]]:
        for file, label in self.rows:
            yield file, self.images_root / file, label


class FairFaceCSV(CSVImages):
    """The original FairFace release: ``fairface_label_{train,val}.csv`` with columns
    file,age,gender,race,service_test, ``file`` relative to the image folder (by default the
    CSV's own folder, e.g. fairface-img-margin025-trainval/ holding train/ and val/)."""

    def __init__(self, csv_path: str | Path, images_root: str | Path | None = None, attribute: str = "gender",
                 **options: Any):
        if attribute not in FAIRFACE_COLUMNS[1:]:
            raise InputError(f"FairFace attribute must be one of {', '.join(FAIRFACE_COLUMNS[1:])}, got {attribute!r}")
        super().__init__(csv_path, images_root, label_column=attribute, file_column="file",
                         required=FAIRFACE_COLUMNS, **options)


# ----------------------------------------------------------------------------- the six-class dataset


def gender_of_class(name: str, words: list[str]) -> str:
    """'female' if the class's words contain 'woman', 'male' if they contain 'man'."""
    lowered = {w.lower() for w in words}
    female, male = "woman" in lowered, "man" in lowered
    if female == male:
        raise InputError(f"class {name!r} has words {words}: expected exactly one of 'man' / 'woman' to give its gender")
    return "female" if female else "male"


class SixClassImages(LabelledImages):
    """The project's dataset split ``<root>/<size>/<split>/<class>/*.png`` (procedural or SD).

    ``attribute``: "class" (the folder name) or "gender" (from the class words). ``size``
    None picks the only size folder under root; root may also be the size folder itself.
    """

    def __init__(self, root: str | Path, size: int | str | None = None, split: str = "test",
                 attribute: str = "gender", class_words: str | Path = CLASS_WORDS, **options: Any):
        super().__init__(**options)
        if attribute not in ("gender", "class"):
            raise InputError(f"six-class dataset labels are 'gender' or 'class', got {attribute!r}")
        root = Path(root).expanduser()
        self.folder = self._split_folder(root, size, split)
        words = load_class_words(class_words)
        present = sorted(p.name for p in self.folder.iterdir() if p.is_dir())
        unknown = [c for c in present if c not in words]
        if unknown:
            raise InputError(f"{self.folder}: class folder(s) {', '.join(unknown)} are not in {class_words}")
        if not present:
            raise InputError(f"{self.folder} has no class folders")
        ordered = [c for c in words if c in present]
        label_of = {c: (gender_of_class(c, words[c]) if attribute == "gender" else c) for c in ordered}
        self.attribute = attribute
        self.files = [(path, label_of[c]) for c in ordered for path in sorted((self.folder / c).iterdir())
                      if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise InputError(f"{self.folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        self.classes = list(GENDERS) if attribute == "gender" else ordered

    @staticmethod
    def _split_folder(root: Path, size: int | str | None, split: str) -> Path:
        if (root / split).is_dir():
            return root / split
        if not root.is_dir():
            raise InputError(f"no such dataset folder {root}")
        if size is None or str(size) == "":
            sizes = sorted(p.name for p in root.iterdir() if (p / split).is_dir())
            if len(sizes) != 1:
                raise InputError(f"{root}: expected one <size>/{split}/ folder, found "
                                 f"{', '.join(sizes) if sizes else 'none'}; pass the size")
            size = sizes[0]
        folder = root / str(size) / split
        if not folder.is_dir():
            raise InputError(f"no folder {folder} (expected <root>/<size>/{split}/<class>/*.png)")
        return folder

    def _count(self) -> int:
        return len(self.files)

    def records(self) -> Iterator[tuple[str, Any, str]]:
        for path, label in self.files:
            yield str(path.relative_to(self.folder)), path, label


# ----------------------------------------------------------------------------- one entry point


def detect_kind(source: str) -> str:
    """'csv'-like files by their columns, saved datasets, six-class trees, else a Hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(f"{source}: expected a label CSV, a dataset folder or a Hub dataset id")
        columns, _ = _read_csv(path)
        return "fairface_csv" if {"file", "gender", "race"} <= set(columns) else "csv"
    if path.is_dir():
        if is_saved_dataset(path):
            return "hf"
        if any((p / "test").is_dir() or p.name in ("test", "train") for p in path.iterdir() if p.is_dir()) \
                or (path / "test").is_dir():
            return "sixclass"
        raise InputError(f"{source}: not a saved dataset (dataset_dict.json / state.json) nor a "
                         f"<size>/<split>/<class>/ image tree; pass a label CSV for a plain image folder")
    if looks_like_path(source):
        raise InputError(f"no such file or folder {source}")
    return "hf"


def open_labelled_images(source: str = FAIRFACE_HUB_ID, kind: str = "auto", attribute: str = "gender", *,
                         config: str | None = "0.25", split: str | None = None,
                         images_root: str | None = None, label_column: str | None = None,
                         image_column: str = "image", size: int | str | None = None,
                         class_words: str | Path = CLASS_WORDS, resize: int = 512, skip_bad: bool = False,
                         limit: int | None = None) -> LabelledImages:
    """Open any supported source; ``kind`` "auto" decides from what ``source`` is.

    ``attribute`` is the label (gender, race, ... ; "class" for the six-class data);
    ``label_column`` overrides it for a plain CSV and a Hugging Face dataset, whose images
    are in ``image_column`` (e.g. CIFAR-10 on the Hub: image column "img", label column
    "label", a ClassLabel). ``split`` defaults to "train" for Hugging Face datasets (as the
    original's FairFace run) and "test" for the six-class data.
    """
    if kind not in KINDS:
        raise InputError(f"unknown image source kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = detect_kind(source)
    options = dict(resize=resize, skip_bad=skip_bad, limit=limit)
    if kind == "hf":
        return HuggingFaceImages(source, config=config, split=split or "train", attribute=label_column or attribute,
                                 image_column=image_column, **options)
    if kind == "fairface_csv":
        return FairFaceCSV(source, images_root, attribute=attribute, **options)
    if kind == "csv":
        return CSVImages(source, images_root, label_column=label_column or "label", **options)
    return SixClassImages(source, size=size, split=split or "test", attribute=attribute,
                          class_words=class_words, **options)
