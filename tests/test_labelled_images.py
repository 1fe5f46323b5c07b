"""Labelled image sources, on small fixtures written to tmp_path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bias_begets_bias.cli import InputError
from statistical_auditing.core.labelled_images import (
    FAIRFACE_RACES,
    CSVImages,
    FairFaceCSV,
    HuggingFaceImages,
    SixClassImages,
    detect_kind,
    gender_of_class,
    images_to_tensor,
    open_labelled_images,
    square_resize,
)


def write_png(path, colour, size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture()
def fairface_release(tmp_path):
    """train/1.jpg ... with fairface_label_train.csv beside train/ (the release layout)."""
    rows = [("train/1.png", "20-29", "Male", "White"), ("train/2.png", "30-39", "Female", "Black"),
            ("train/3.png", "3-9", "Female", "East Asian")]
    for i, (file, *_rest) in enumerate(rows):
        write_png(tmp_path / file, (40 * i, 10, 10))
    lines = ["file,age,gender,race,service_test"] + [f"{f},{a},{g},{r},True" for f, a, g, r in rows]
    (tmp_path / "fairface_label_train.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_square_resize_by_hand():
    assert square_resize(Image.new("RGB", (40, 20)), 10).size == (10, 10)  # 40x20 -> 20x10 -> 10x10
    # 2 wide, 4 tall, one colour per row: the shorter side is already 2, so the crop keeps rows 1-2
    tall = Image.new("RGB", (2, 4))
    rows = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    for y, colour in enumerate(rows):
        for x in range(2):
            tall.putpixel((x, y), colour)
    square = square_resize(tall, 2)
    assert square.size == (2, 2)
    assert square.getpixel((0, 0)) == rows[1] and square.getpixel((1, 1)) == rows[2]


def test_fairface_csv_release_layout(fairface_release):
    source = FairFaceCSV(fairface_release / "fairface_label_train.csv", resize=16)
    items = list(source)
    assert [i for i, _, _ in items] == ["train/1.png", "train/2.png", "train/3.png"]
    assert [label for _, _, label in items] == ["male", "female", "female"]
    assert source.classes == ["male", "female"]
    assert all(img.mode == "RGB" and img.size == (16, 16) for _, img, _ in items)
    races = FairFaceCSV(fairface_release / "fairface_label_train.csv", attribute="race", resize=0)
    assert races.classes == list(FAIRFACE_RACES)
    assert [label for _, _, label in races] == ["White", "Black", "East Asian"]
    assert next(iter(races))[1].size == (12, 8)
    assert detect_kind(str(fairface_release / "fairface_label_train.csv")) == "fairface_csv"


def test_fairface_csv_missing_columns(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("file,gender\na.png,Male\n")
    with pytest.raises(InputError) as info:
        FairFaceCSV(bad)
    message = str(info.value)
    assert str(bad) in message and "age" in message and "race" in message and "service_test" in message


def test_corrupt_image_is_named_or_skipped(fairface_release, capsys):
    (fairface_release / "train" / "2.png").write_bytes(b"this is not a png")
    csv_path = fairface_release / "fairface_label_train.csv"
    with pytest.raises(InputError, match="train/2.png"):
        list(FairFaceCSV(csv_path))
    source = FairFaceCSV(csv_path, skip_bad=True, resize=8)
    assert [i for i, _, _ in source] == ["train/1.png", "train/3.png"]
    assert [i for i, _ in source.skipped] == ["train/2.png"]
    assert "skipped unreadable image train/2.png" in capsys.readouterr().err
    # the limit counts images yielded, so a skipped one does not shorten the run
    assert [i for i, _, _ in FairFaceCSV(csv_path, skip_bad=True, limit=2)] == ["train/1.png", "train/3.png"]


def test_missing_file_is_named(fairface_release):
    (fairface_release / "train" / "3.png").unlink()
    with pytest.raises(InputError, match="train/3.png"):
        list(FairFaceCSV(fairface_release / "fairface_label_train.csv"))


def test_generic_csv_with_label_column(tmp_path):
    images = tmp_path / "imgs"
    write_png(images / "a.png", (0, 0, 0))
    write_png(images / "b.png", (255, 255, 255))
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label,who\na.png,cat,x\nb.png,dog,y\n")
    source = CSVImages(labels, images_root=images, resize=4)
    assert source.classes == ["cat", "dog"] and len(source) == 2
    assert [(i, lab) for i, _, lab in source] == [("a.png", "cat"), ("b.png", "dog")]
    by_who = open_labelled_images(str(labels), label_column="who", images_root=str(images), resize=4)
    assert [lab for _, _, lab in by_who] == ["x", "y"]
    with pytest.raises(InputError, match="missing column"):
        CSVImages(labels, images_root=images, label_column="nope")


def test_saved_hf_dataset_class_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "image": datasets.Image(),
        "gender": datasets.ClassLabel(names=["Male", "Female"]),
        "race": datasets.ClassLabel(names=list(FAIRFACE_RACES)),
    })
    pictures = [Image.fromarray(np.full((6, 6, 3), 30 * i, np.uint8)) for i in range(3)]
    data = datasets.Dataset.from_dict({"image": pictures, "gender": [1, 0, 1], "race": [3, 2, 6]}, features=features)
    folder = tmp_path / "fairface_saved"
    datasets.DatasetDict({"train": data}).save_to_disk(str(folder))
    source = open_labelled_images(str(folder), resize=8)
    assert isinstance(source, HuggingFaceImages)
    assert source.classes == ["male", "female"]
    assert [(i, lab) for i, _, lab in source] == [("train/0", "female"), ("train/1", "male"), ("train/2", "female")]
    races = open_labelled_images(str(folder), attribute="race", limit=2)
    assert [lab for _, _, lab in races] == ["White", "Black"] and races.classes == list(FAIRFACE_RACES)
    with pytest.raises(InputError, match="no split 'validation'"):
        open_labelled_images(str(folder), split="validation")
    with pytest.raises(InputError, match="age"):
        open_labelled_images(str(folder), attribute="age")


def test_saved_hf_dataset_with_other_image_and_label_columns(tmp_path):
    """CIFAR-10 on the Hub: images in "img", labels in a ClassLabel "label"; string labels also work."""
    datasets = pytest.importorskip("datasets")
    pictures = [Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)) for i in range(3)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"]),
                                  "kind": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"img": pictures, "label": [1, 0, 1], "kind": ["wild", "pet", "pet"]},
                                      features=features)
    folder = tmp_path / "cifar_like"
    data.save_to_disk(str(folder))  # a Dataset (state.json), not a DatasetDict
    source = open_labelled_images(str(folder), label_column="label", image_column="img", resize=4)
    assert source.classes == ["cat", "dog"]
    items = list(source)
    assert [(i, lab) for i, _, lab in items] == [("train/0", "dog"), ("train/1", "cat"), ("train/2", "dog")]
    assert items[1][1].getpixel((0, 0)) == (40, 40, 40) and items[1][1].size == (4, 4)
    strings = open_labelled_images(str(folder), label_column="kind", image_column="img", resize=0)
    assert strings.classes == ["pet", "wild"] and [lab for _, _, lab in strings] == ["wild", "pet", "pet"]
    with pytest.raises(InputError, match=r"no column\(s\) image; .*--image_column"):
        open_labelled_images(str(folder), label_column="label")


@pytest.mark.integration
def test_hub_dataset_offline_gives_clear_error():
    # a subprocess, because datasets reads HF_HUB_OFFLINE when it is imported
    code = ("from statistical_auditing.core.labelled_images import open_labelled_images\n"
            "from bias_begets_bias.cli import run_main\n"
            "run_main(lambda: open_labelled_images('nobody-here/no-such-dataset'))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "nobody-here/no-such-dataset" in done.stderr and "save_to_disk" in done.stderr
    assert "Traceback" not in done.stderr


def test_six_class_tree(tmp_path):
    words = {"man": ["man", "person", "man"], "woman": ["woman", "person", "woman"],
             "male_nurse": ["man", "nurse", "person"], "female_nurse": ["woman", "nurse", "person"]}
    words_file = tmp_path / "class_words.json"
    words_file.write_text(json.dumps(words))
    root = tmp_path / "portraits"
    for c in words:
        for j in range(2):
            write_png(root / "32" / "test" / c / f"{j:03d}.png", (j, 0, 0), size=(32, 32))
    source = SixClassImages(root, class_words=words_file, resize=0)
    labels = [(i, lab) for i, _, lab in source]
    assert labels[:2] == [("man/000.png", "male"), ("man/001.png", "male")]
    assert dict(labels)["female_nurse/001.png"] == "female" and len(labels) == 8
    assert source.classes == ["male", "female"]
    by_class = open_labelled_images(str(root), attribute="class", class_words=words_file)
    assert by_class.classes == list(words) and next(iter(by_class))[1].size == (512, 512)
    assert detect_kind(str(root)) == "sixclass"
    (root / "32" / "test" / "robot").mkdir()
    with pytest.raises(InputError, match="robot"):
        SixClassImages(root, class_words=words_file)


def test_gender_of_class():
    assert gender_of_class("female_phil", ["woman", "philosopher", "person"]) == "female"
    assert gender_of_class("man", ["man", "person"]) == "male"
    with pytest.raises(InputError, match="person"):
        gender_of_class("person", ["person"])


def test_bad_sources(tmp_path):
    with pytest.raises(InputError, match="no such"):
        open_labelled_images(str(tmp_path / "missing" / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a saved dataset"):
        open_labelled_images(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="kind"):
        open_labelled_images("x", kind="zip")


def test_images_to_tensor_by_hand():
    white, red = Image.new("RGB", (3, 2), (255, 255, 255)), Image.new("RGB", (3, 2), (255, 0, 0))
    batch = images_to_tensor([white, red])
    assert batch.shape == (2, 3, 2, 3) and batch.dtype.is_floating_point
    assert batch[0].min() == 1.0 and batch[1, 0].min() == 1.0 and batch[1, 1:].max() == 0.0
    with pytest.raises(InputError, match="different sizes"):
        images_to_tensor([white, Image.new("RGB", (2, 2))])


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_an_image_claiming_an_enormous_size_is_refused_from_its_header(tmp_path):
    from statistical_auditing.core.labelled_images import UnreadableImage, check_header, decode_image

    bomb = tmp_path / "big.png"
    bomb.write_bytes(_png_claiming(100_000, 100_000))  # above Pillow's error limit
    warning_sized = tmp_path / "large.png"
    warning_sized.write_bytes(_png_claiming(10_000, 10_000))  # between its warning and error limits
    for path in (bomb, warning_sized):
        for read in (check_header, decode_image):
            with pytest.raises(UnreadableImage, match="claims an enormous size"):
                read(path.name, path)
    with pytest.raises(UnreadableImage, match="claims an enormous size"):
        decode_image("bytes", bomb.read_bytes())


def test_sixteen_bit_images_decode_to_their_grey_levels(tmp_path):
    from statistical_auditing.core.labelled_images import decode_image

    values = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    decoded = np.asarray(decode_image("deep.png", path))
    assert decoded.shape == (2, 2, 3)
    assert decoded[..., 0].tolist() == [[0, 128], [255, 1]]  # not all white


def test_a_label_csv_that_is_not_utf8_names_the_file(tmp_path):
    from statistical_auditing.core.labelled_images import open_labelled_images

    labels = tmp_path / "labels.csv"
    labels.write_bytes("file,label\ncaf\xe9.png,male\n".encode("latin-1"))
    with pytest.raises(InputError, match="labels.csv: expected a label CSV in UTF-8 text"):
        open_labelled_images(str(labels), kind="csv")
