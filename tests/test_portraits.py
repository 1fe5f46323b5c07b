import json

import numpy as np
import pytest

from bias_begets_bias.portraits import (RENDER_SIZE, attributes_from_prompt, measure_attributes,
                                              render_portrait)
from bias_begets_bias.utils import DATA_DIR


def test_prompts_name_one_attribute_of_each_kind():
    prompts = json.loads((DATA_DIR / "prompts.json").read_text())
    attributes = {name: attributes_from_prompt(p) for name, p in prompts.items()}
    assert attributes["man"] == {"hair": "short", "clothes": "gray shirt", "scene": "neutral"}
    assert attributes["female_nurse"] == {"hair": "long", "clothes": "blue scrubs", "scene": "hospital"}
    assert attributes["male_phil"] == {"hair": "short", "clothes": "tweed jacket", "scene": "library"}
    with pytest.raises(ValueError, match="hair"):
        attributes_from_prompt("a man with short black hair and long black hair in a library, gray shirt")


@pytest.mark.parametrize("size", [32, 64])
def test_attribute_rules_are_at_least_99_percent_accurate_on_held_out_renders(size):
    prompts = json.loads((DATA_DIR / "prompts.json").read_text())
    correct = total = 0
    for k, prompt in enumerate(prompts.values()):
        truth = attributes_from_prompt(prompt)
        for i in range(60):  # seeds never used by the dataset generator (different seed family)
            image = render_portrait(truth, np.random.default_rng([999, k, i]), size)
            measured = measure_attributes(image)[0]
            correct += measured["hair"] == truth["hair"] and measured["scene"] == truth["scene"]
            total += 1
    assert correct / total >= 0.99, f"{correct}/{total}"


def test_measurement_of_hand_made_images():
    gray = np.full((32, 32, 3), 150, dtype=np.uint8)
    assert measure_attributes(gray)[0] == {"hair": "none", "scene": "neutral"}
    warm = gray.copy()
    warm[..., 0], warm[..., 2] = 170, 100
    assert measure_attributes(warm)[0]["scene"] == "library"
    cool = gray.copy()
    cool[..., 2] = 200
    assert measure_attributes(cool)[0]["scene"] == "hospital"
    short, long = gray.copy(), gray.copy()
    short[4:9, 12:20] = 20  # 5 rows of hair: span 4/32 < 0.3
    long[4:20, 12:20] = 20  # 16 rows of hair: span > 0.3
    assert measure_attributes(short)[0]["hair"] == "short"
    assert measure_attributes(long)[0]["hair"] == "long"


def test_render_is_deterministic_and_sized():
    truth = {"hair": "long", "clothes": "blue scrubs", "scene": "hospital"}
    a = render_portrait(truth, np.random.default_rng(5), 32)
    b = render_portrait(truth, np.random.default_rng(5), 32)
    assert a.size == (32, 32) and np.array_equal(np.asarray(a), np.asarray(b))
    assert render_portrait(truth, np.random.default_rng(5), RENDER_SIZE).size == (RENDER_SIZE, RENDER_SIZE)


def test_batch_tensor_input_matches_pil_input():
    import torch

    truth = {"hair": "short", "clothes": "tweed jacket", "scene": "library"}
    image = render_portrait(truth, np.random.default_rng(1), 32)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    assert measure_attributes(tensor) == measure_attributes(image) == [{"hair": "short", "scene": "library"}]


def _portrait(corner_rgb, clothes_rgb, hair_rows=0):
    """A 32 px image: background colour, a clothes patch at the bottom, optional hair rows at the top."""
    image = np.full((32, 32, 3), 150, dtype=np.uint8)
    image[:, :] = corner_rgb
    image[26:, 8:24] = clothes_rgb
    if hair_rows:
        image[4:4 + hair_rows, 12:20] = 20
    return image


def test_scene_needs_background_and_clothes_to_agree():
    gray, scrubs, tweed = (128, 128, 128), (60, 110, 190), (135, 112, 82)
    neutral, hospital, library = (150, 150, 148), (190, 222, 228), (125, 82, 52)
    calls = [measure_attributes(_portrait(bg, cl))[0]["scene"]
             for bg, cl in ((neutral, gray), (hospital, scrubs), (library, tweed))]
    assert calls == ["neutral", "hospital", "library"]
    # hybrids: a brown wall behind a gray shirt, a pale blue wall without scrubs
    assert measure_attributes(_portrait(library, gray))[0]["scene"] == "unclear"
    assert measure_attributes(_portrait(hospital, gray))[0]["scene"] == "unclear"
    # a background tint between the bands (R - B = 20: neither neutral <= 10 nor library >= 30)
    assert measure_attributes(_portrait((160, 150, 140), tweed))[0]["scene"] == "unclear"


def test_hair_between_the_bands_is_unclear():
    background, clothes = (150, 150, 148), (128, 128, 128)
    # 8 hair rows x 8 columns: span 7/32 = 0.22 (between 0.20 and 0.30), cover 64/1024 = 6.25% (> 6%)
    assert measure_attributes(_portrait(background, clothes, hair_rows=8))[0]["hair"] == "unclear"
    # 14 rows but only 2 columns: a long span with too little hair to be long hair (2.7% < 4.5%)
    image = _portrait(background, clothes)
    image[4:18, 15:17] = 20
    assert measure_attributes(image)[0]["hair"] == "unclear"


def test_fidelity_bar_by_hand_shows_the_share_that_missed():
    """Woman with 484 long of 510 called (94.9%) misses the 95% bar; the message must not round it to 95%."""
    from bias_begets_bias.fidelity_bar import bar_failures
    expected = {"neutral": 0.5, "hospital": 0.25, "library": 0.25}
    shares = {"hair_called": 510 / 512, "long": 484 / 510, "neutral": 0.5, "hospital": 0.25, "library": 0.25}
    assert bar_failures("woman", shares, expected) == ["long hair 94.9% < 95%"]
    assert bar_failures("woman", shares | {"long": 485 / 510}, expected) == []  # 95.1%
    shares_man = shares | {"long": 0.0, "hospital": 0.12, "neutral": 0.63}  # 13 points from 25%: outside 12
    assert bar_failures("man", shares_man, expected) == ["neutral 63.0% vs 50% expected",
                                                          "hospital 12.0% vs 25% expected"]


def test_fidelity_bar_flags_reach_the_bar():
    """fidelity.py's --bar_* flags set the bar it checks (before, they were parsed and then ignored)."""
    from bias_begets_bias.cli import config_from_constants, constants_of
    from bias_begets_bias.fidelity_bar import AcceptanceBar, bar_failures
    from diffusion_from_scratch import fidelity

    cfg = config_from_constants(constants_of(vars(fidelity)), argv=["--bar_min_long_woman", "0.9"])
    bar = fidelity.bar_from_config(cfg)
    assert bar == AcceptanceBar(min_long_woman=0.9)
    expected = {"neutral": 0.5, "hospital": 0.25, "library": 0.25}
    shares = {"hair_called": 1.0, "long": 0.92, "neutral": 0.5, "hospital": 0.25, "library": 0.25}
    assert bar_failures("woman", shares, expected) == ["long hair 92.0% < 95%"]
    assert bar_failures("woman", shares, expected, bar) == []
