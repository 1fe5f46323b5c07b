import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bias_begets_bias.cli import InputError
from bias_begets_bias.utils import atomic_write_bytes, current_umask, load_split, progress_bar, to_rgb8


def test_progress_bar_redraws_rarely_when_not_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file, not a terminal
    bar = progress_bar(range(3), file=io.StringIO())
    assert bar.mininterval == 30.0 and bar.maxinterval == 30.0
    bar.close()
    bar = progress_bar(range(3), file=io.StringIO(), mininterval=1.0)  # an explicit value wins
    assert bar.mininterval == 1.0
    bar.close()


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")  # what open() gives: 0o666 & ~umask
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# ----------------------------------------------------------------------------- image modes and bit depths
def png_16bit_rgb(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one): IHDR bit depth 16,
    colour type 2, one unfiltered scanline per row of big-endian samples."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[r].astype(">u2").tobytes() for r in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.asarray(to_rgb8(image, path))


def test_16_bit_greyscale_scales_to_8_bits_instead_of_turning_white(tmp_path):
    """v -> round(v * 255 / 65535): 0 -> 0, 257 -> 1, 32768 -> 128, 65535 -> 255 (Pillow's own
    convert("RGB") clips 32768 and 65535 to 255, and 257 too)."""
    values = np.array([[0, 257], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = decoded(tmp_path / "g16.png")
    assert rgb.shape == (2, 2, 3) and rgb[..., 0].tolist() == [[0, 1], [128, 255]]
    assert (rgb[..., 0] == rgb[..., 2]).all()
    (tmp_path / "g16.pgm").write_bytes(b"P5 2 2 65535\n" + values.astype(">u2").tobytes())  # Pillow: mode I
    assert decoded(tmp_path / "g16.pgm")[..., 1].tolist() == [[0, 1], [128, 255]]


def test_16_bit_rgb_palette_and_alpha_modes(tmp_path):
    values = np.array([[[0, 65535, 32768], [4660, 43981, 65280]]], dtype=np.uint16)  # 0x1234, 0xABCD, 0xFF00
    (tmp_path / "rgb16.png").write_bytes(png_16bit_rgb(values))
    assert decoded(tmp_path / "rgb16.png").tolist() == [[[0, 255, 128], [18, 171, 255]]]  # the high bytes
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putdata([1, 0])
    palette.save(tmp_path / "p.png")
    assert decoded(tmp_path / "p.png").tolist() == [[[200, 100, 0], [10, 20, 30]]]
    Image.new("LA", (1, 1), (77, 0)).save(tmp_path / "la.png")
    assert decoded(tmp_path / "la.png").tolist() == [[[77, 77, 77]]]  # alpha dropped, as torchvision's loader
    Image.new("1", (1, 2)).save(tmp_path / "bw.png")
    assert decoded(tmp_path / "bw.png").tolist() == [[[0, 0, 0]], [[0, 0, 0]]]


def test_modes_without_an_intensity_range_are_refused(tmp_path):
    Image.fromarray(np.array([[0.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(InputError, match=r"f.tif: mode F \(floating-point pixels\)"):
        decoded(tmp_path / "f.tif")


def test_load_split_reads_a_16_bit_png_correctly(tmp_path):
    for name, value in (("a", 65535), ("b", 32768)):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), value, dtype=np.uint16)).save(tmp_path / "train" / name / "0.png")
    images, labels = load_split(tmp_path, "train", ["a", "b"], 4)
    assert images.dtype == torch.uint8 and labels.tolist() == [0, 1]
    assert images[0].unique().tolist() == [255] and images[1].unique().tolist() == [128]


# ----------------------------------------------------------------------------- bad files and room (issue 11)
def test_text_files_that_are_missing_foreign_or_absurdly_large_are_one_clear_error(tmp_path):
    from bias_begets_bias.utils import load_json, read_text_file

    latin = tmp_path / "words.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"words.txt: expected a word list in UTF-8 text, but byte 3 is not UTF-8"):
        read_text_file(latin, "a word list")
    with pytest.raises(InputError, match=r"too large for a word list \(at most 2 bytes\)"):
        read_text_file(latin, "a word list", limit=2)
    with pytest.raises(InputError, match="cannot read a word list .*missing.txt: No such file"):
        read_text_file(tmp_path / "missing.txt", "a word list")
    truncated = tmp_path / "config.json"
    truncated.write_text('{"a": [1, 2')
    with pytest.raises(InputError, match="config.json: invalid JSON"):
        load_json(truncated)


def test_output_folders_are_checked_before_anything_is_written(tmp_path):
    from bias_begets_bias.utils import require_writable, writable_folder

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for path in (a_file, a_file / "below", a_file / "below" / "deeper"):
        with pytest.raises(InputError, match=r"^--out: cannot write to .*is a file, not a folder"):
            require_writable(path, "out")
        with pytest.raises(InputError, match="^--out: cannot write to"):
            writable_folder(path, "out")
    require_writable(tmp_path / "new" / "deep", "out")
    assert not (tmp_path / "new").exists()  # the check creates nothing
    assert writable_folder(tmp_path / "new" / "deep", "out").is_dir()
    assert [p.name for p in (tmp_path / "new" / "deep").iterdir()] == []  # no probe left behind
    if os.geteuid() != 0:  # permissions do not stop root
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        with pytest.raises(InputError, match="not writable"):
            require_writable(locked / "out", "out")


def test_requests_that_cannot_fit_are_refused_with_the_flag_named(tmp_path):
    from bias_begets_bias.utils import available_memory, free_disk, human_bytes, require_disk, require_memory

    assert available_memory() > 0 and free_disk(tmp_path / "not" / "yet") > 0
    require_memory(1000, "--n 1")
    require_disk(tmp_path, 1000, "--n 1")
    with pytest.raises(InputError, match=r"^--n 10\*\*20: needs about 100000.0 PB of memory, more than the"):
        require_memory(10 ** 20, "--n 10**20")
    with pytest.raises(InputError, match=r"^--n 10\*\*20: needs about .* of disk in"):
        require_disk(tmp_path, 10 ** 20, "--n 10**20")
    assert human_bytes(999) == "999 bytes" and human_bytes(1.5e9) == "1.5 GB"
