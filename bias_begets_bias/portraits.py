"""Procedural portraits that mirror the six Stable Diffusion prompts, and attribute rules.

The renderer reads its attributes from the prompt text itself (``attributes_from_prompt``):
hair length ("short/long black hair"), clothing ("gray shirt", "blue scrubs", "tweed
jacket") and scene ("neutral background", "hospital", "library"). A portrait is drawn
large (``RENDER_SIZE`` px) from smooth shapes with soft edges, then resized bicubically,
like the SD images. Jitter covers position, scale, skin tone, light and colours; there is
deliberately no per-pixel noise or fine texture, which carries no attribute and makes the
images hard to learn for a small DDPM on a CPU.

``measure_attributes`` reads hair (long / short / none) and scene (neutral / hospital /
library) back from ANY image - a render or a generated sample - with simple colour and
geometry rules, so the gender mix of generated images can be measured exactly. The rules
rely on what the renderer guarantees:
- hair is near-black and grey (max channel < 70, chroma < 25); nothing else is;
- the top corners show background only: neutral is grey (|R - B| small), the hospital
  wall is cool (B > R), the library warm (R > B);
- short hair spans ~0.14 of the image height, long hair ~0.5 (down to the shoulders).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

RENDER_SIZE = 128  # px; portraits are drawn at this size, then resized bicubically

HAIR_LENGTHS = ("short", "long")
CLOTHES = ("gray shirt", "blue scrubs", "tweed jacket")
SCENES = ("neutral", "hospital", "library")
_SCENE_KEYWORDS = {"neutral": "neutral background", "hospital": "hospital", "library": "library"}

# Base colours (RGB 0-255) before jitter; chosen so the measurement rules separate them.
_CLOTHES_RGB = {"gray shirt": (128, 128, 128), "blue scrubs": (60, 110, 190), "tweed jacket": (135, 112, 82)}
_HAIR_RGB = (28, 26, 25)
_NEUTRAL_RGB = (150, 150, 148)
_HOSPITAL_WALL_RGB = (190, 222, 228)
_HOSPITAL_BAND_RGB = (70, 160, 150)
_LIBRARY_WALL_RGB = (125, 82, 52)
_BOOK_RGBS = ((150, 60, 45), (110, 70, 40), (165, 105, 55), (120, 45, 40), (140, 90, 60))

# Measurement thresholds (fractions of the image side, colour units 0-255). On the renders hair
# has max channel <= ~38 while everything else has >= ~95, and every colour class below sits far
# from its thresholds; generated samples blur and tint, so calls between the bands are "unclear".
_HAIR_MAX_VALUE = 80
_HAIR_MAX_CHROMA = 40
_HAIR_MIN_FRACTION = 0.01  # share of pixels that must be hair for hair to count as present
_SHORT_MAX_SPAN, _LONG_MIN_SPAN = 0.20, 0.30  # vertical span (10th-90th percentile) of the hair rows
_SHORT_MAX_FRACTION, _LONG_MIN_FRACTION = 0.06, 0.045  # renders: short <= 0.036, long >= 0.071
_NEUTRAL_MAX_TINT = 12  # |R - B| of the top corners (renders: <= 6; samples drift to a pinkish grey)
_HOSPITAL_MIN_COOLNESS = 8  # B - R of the top corners, with scrubs (renders: >= 18; samples: pale blue + band + scrubs at 12)
_LIBRARY_MIN_WARMTH = 30  # R - B of the top corners, with tweed (renders: >= 60)
_GRAY_MAX_CHROMA = 30  # clothes patch (renders: gray <= 26; scrubs >= 99; tweed >= 29 with R - B >= 29)
_SCRUBS_MIN_BLUE = 50  # B - R of the clothes patch (renders: >= 99)
_TWEED_MIN_WARMTH = 28  # R - B of the clothes patch (renders: tweed >= 29, gray shirt <= 26)
SCENE_CLOTHES = {"neutral": "gray shirt", "hospital": "blue scrubs", "library": "tweed jacket"}


def attributes_from_prompt(prompt: str) -> dict[str, str]:
    """Hair, clothes and scene named by a prompt; raises ValueError when one is missing or ambiguous."""
    text = prompt.lower()
    found = {
        "hair": [h for h in HAIR_LENGTHS if f"{h} black hair" in text],
        "clothes": [c for c in CLOTHES if c in text],
        "scene": [s for s, keyword in _SCENE_KEYWORDS.items() if keyword in text],
    }
    for kind, values in found.items():
        if len(values) != 1:
            raise ValueError(f"prompt must name exactly one {kind}; found {values or 'none'} in: {prompt[:80]}...")
    return {kind: values[0] for kind, values in found.items()}


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[int, int, int], spread: float) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32) + rng.uniform(-spread, spread, size=3).astype(np.float32)


def _soft_ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                  edge: float) -> np.ndarray:
    """Coverage in [0, 1] of an ellipse with a soft edge ``edge`` (in image fractions)."""
    distance = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1.0 - distance) * min(rx, ry) / edge + 0.5, 0.0, 1.0)


def _soft_box(xx: np.ndarray, yy: np.ndarray, x0: float, x1: float, y0: float, y1: float,
              edge: float) -> np.ndarray:
    inside_x = np.clip(np.minimum(xx - x0, x1 - xx) / edge + 0.5, 0.0, 1.0)
    inside_y = np.clip(np.minimum(yy - y0, y1 - yy) / edge + 0.5, 0.0, 1.0)
    return inside_x * inside_y


def _paint(canvas: np.ndarray, coverage: np.ndarray, rgb: np.ndarray) -> None:
    canvas *= 1.0 - coverage[..., None]
    canvas += coverage[..., None] * rgb


def _background(scene: str, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A smooth scene background; blurred afterwards like a shallow depth of field."""
    canvas = np.empty(xx.shape + (3,), dtype=np.float32)
    if scene == "neutral":
        base = _jitter_rgb(rng, _NEUTRAL_RGB, 10)
        base[2] = base[0] + rng.uniform(-5, 5)  # keep it grey: R ~ B
        canvas[:] = base
        canvas *= (1.0 + rng.uniform(-0.12, 0.12) * (yy - 0.5))[..., None]  # soft vertical gradient
    elif scene == "hospital":
        canvas[:] = _jitter_rgb(rng, _HOSPITAL_WALL_RGB, 10)
        band_top = rng.uniform(0.52, 0.60)
        _paint(canvas, _soft_box(xx, yy, -1, 2, band_top, band_top + 0.07, 0.01),
               _jitter_rgb(rng, _HOSPITAL_BAND_RGB, 12))
    elif scene == "library":
        canvas[:] = _jitter_rgb(rng, _LIBRARY_WALL_RGB, 10)
        # Broad blocks of books on three shelves; wide enough to survive a 32 px resize.
        for shelf_top in (0.04, 0.36, 0.68):
            x = rng.uniform(-0.08, 0.0)
            while x < 1.0:
                width = rng.uniform(0.10, 0.20)
                book = _BOOK_RGBS[rng.integers(len(_BOOK_RGBS))]
                _paint(canvas, _soft_box(xx, yy, x, x + width - 0.01, shelf_top, shelf_top + 0.26, 0.01),
                       _jitter_rgb(rng, book, 12))
                x += width
    else:
        raise ValueError(f"unknown scene {scene!r}; expected one of {SCENES}")
    return canvas


def render_portrait(attributes: dict[str, str], rng: np.random.Generator, size: int) -> Image.Image:
    """Render one portrait with the given hair / clothes / scene at ``size`` x ``size`` px."""
    n = RENDER_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    xx, yy = (xx + 0.5) / n, (yy + 0.5) / n
    edge = 1.0 / n

    background = _background(attributes["scene"], rng, xx, yy)
    blurred = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=rng.uniform(1.5, 3.0)))
    canvas = np.asarray(blurred, dtype=np.float32).copy()

    scale = rng.uniform(0.9, 1.1)
    cx = 0.5 + rng.uniform(-0.07, 0.07)
    cy = 0.40 + rng.uniform(-0.04, 0.04)
    head_rx, head_ry = 0.13 * scale, 0.17 * scale
    skin = np.asarray([rng.uniform(200, 240), 0, 0], dtype=np.float32)
    skin[1] = skin[0] * rng.uniform(0.74, 0.84)
    skin[2] = skin[0] * rng.uniform(0.60, 0.72)
    hair = _jitter_rgb(rng, _HAIR_RGB, 6)
    clothes = _jitter_rgb(rng, _CLOTHES_RGB[attributes["clothes"]], 12)

    # Torso: a wide ellipse rising from the bottom edge, shoulders at ~0.68.
    shoulder_top = cy + 0.27 * scale
    _paint(canvas, _soft_ellipse(xx, yy, cx, shoulder_top + 0.40 * scale, 0.38 * scale, 0.40 * scale, edge), clothes)
    if attributes["hair"] == "long":  # falls over the shoulders, framing face and neck
        _paint(canvas, _soft_ellipse(xx, yy, cx, cy - 0.02 * scale, 0.19 * scale, 0.21 * scale, edge), hair)
        _paint(canvas, _soft_box(xx, yy, cx - 0.19 * scale, cx + 0.19 * scale, cy, cy + 0.32 * scale, edge), hair)
    # Neck, then face.
    _paint(canvas, _soft_box(xx, yy, cx - 0.05 * scale, cx + 0.05 * scale, cy + 0.10 * scale, shoulder_top + 0.03,
                             edge), skin * 0.92)
    _paint(canvas, _soft_ellipse(xx, yy, cx, cy, head_rx, head_ry, edge), skin)
    # Hair on top of the head (both lengths): the part of a slightly larger ellipse above the brow.
    cap = _soft_ellipse(xx, yy, cx, cy - 0.03 * scale, head_rx * 1.12, head_ry * 1.02, edge)
    cap *= np.clip((cy - 0.06 * scale - yy) / edge + 0.5, 0.0, 1.0)
    _paint(canvas, cap, hair)

    canvas *= rng.uniform(0.88, 1.12)  # global light
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))
    if size != n:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def _as_uint8_batch(images) -> np.ndarray:
    """Accept a PIL image, an HxWx3 / NxHxWx3 uint8 array, or a float tensor/array in [0, 1] (N,3,H,W)."""
    if isinstance(images, Image.Image):
        return np.asarray(images.convert("RGB"))[None]
    array = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"expected an image or a batch of images, got shape {array.shape}")
    if array.shape[1] == 3 and array.shape[-1] != 3:  # N,3,H,W -> N,H,W,3
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return array


def hair_call(mask: np.ndarray) -> str:
    """long / short / none / unclear from a boolean hair mask (H, W): none below 1% hair pixels;
    short when the 10th-90th percentile span of hair rows is <= 0.20 of the height AND the hair
    covers <= 6% of the image; long when the span is >= 0.30 AND the cover >= 4.5%; otherwise
    the two measures disagree or fall between the bands (a blurred or hybrid sample): unclear."""
    height, width = mask.shape
    rows = np.nonzero(mask)[0]
    fraction = rows.size / (height * width)
    if fraction < _HAIR_MIN_FRACTION:
        return "none"
    low, high = np.percentile(rows, [10, 90])
    span = (high - low) / height
    if span <= _SHORT_MAX_SPAN and fraction <= _SHORT_MAX_FRACTION:
        return "short"
    if span >= _LONG_MIN_SPAN and fraction >= _LONG_MIN_FRACTION:
        return "long"
    return "unclear"


def scene_call(corner_rgb: np.ndarray, clothes_rgb: np.ndarray) -> str:
    """neutral / hospital / library / unclear from the mean colour of the top corners (the
    background) and of the bottom-centre patch (the clothes), which the data always pairs:
    neutral = a grey wall (|R - B| <= 12) with a grey shirt (chroma <= 30); hospital = a cool
    wall (B - R >= 8) with blue scrubs (B - R >= 50); library = a warm wall (R - B >= 30) with
    tweed (R - B >= 28). Anything else - a tint between the bands, or clothes of another scene
    (a brown wall behind a grey shirt, a pale wall without scrubs) - is an unclear hybrid."""
    tint = float(corner_rgb[0] - corner_rgb[2])
    red, _, blue = (float(v) for v in clothes_rgb)
    chroma = float(clothes_rgb.max() - clothes_rgb.min())
    if abs(tint) <= _NEUTRAL_MAX_TINT and chroma <= _GRAY_MAX_CHROMA:
        return "neutral"
    if -tint >= _HOSPITAL_MIN_COOLNESS and blue - red >= _SCRUBS_MIN_BLUE:
        return "hospital"
    if tint >= _LIBRARY_MIN_WARMTH and red - blue >= _TWEED_MIN_WARMTH:
        return "library"
    return "unclear"


def measure_attributes(images) -> list[dict[str, str]]:
    """Hair (long / short / none / unclear) and scene (neutral / hospital / library / unclear) of each image.

    A pixel is hair when max(R, G, B) < 80 and max - min < 40 (on the renders hair is <= ~38 and
    every other pixel >= ~95); see ``hair_call``. The scene comes from the two top corners (top
    30%, outer 18% each side) and the clothes patch (bottom 15%, middle 30%); see ``scene_call``.
    Exact on the renders (tested); "unclear" is how a blurred or hybrid sample is reported
    instead of being forced into a class.
    """
    batch = _as_uint8_batch(images).astype(np.int16)
    _, height, width, _ = batch.shape
    value = batch.max(axis=-1)
    chroma = value - batch.min(axis=-1)
    hair_mask = (value < _HAIR_MAX_VALUE) & (chroma < _HAIR_MAX_CHROMA)
    corner_rows = slice(0, max(1, int(0.30 * height)))
    corner_width = max(1, int(0.18 * width))
    corners = np.concatenate([batch[:, corner_rows, :corner_width], batch[:, corner_rows, -corner_width:]], axis=2)
    corner_rgb = corners.reshape(len(batch), -1, 3).mean(axis=1)
    clothes = batch[:, int(0.85 * height):, int(0.35 * width):max(int(0.35 * width) + 1, int(0.65 * width))]
    clothes_rgb = clothes.reshape(len(batch), -1, 3).mean(axis=1)
    return [{"hair": hair_call(mask), "scene": scene_call(corner, cloth)}
            for mask, corner, cloth in zip(hair_mask, corner_rgb, clothes_rgb)]
