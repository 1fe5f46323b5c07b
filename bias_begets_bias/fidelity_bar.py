"""The seen-word control: what the training data teaches each word (hair, scene), what a run's
samples show, and the acceptance bar between them. Used by diffusion_from_scratch/fidelity.py
and by the audit (statistical_auditing/audit.py), which checks the same bar on its own draws."""
from __future__ import annotations

import dataclasses
from collections import Counter

from bias_begets_bias.portraits import SCENES, attributes_from_prompt


@dataclasses.dataclass(frozen=True)
class AcceptanceBar:
    """The acceptance bar (issue "The tiny preset must obey its conditioning"), checked at guidance 1."""

    max_long_man: float = 0.05  # long hair among "man"'s called images at most this
    min_long_woman: float = 0.95  # long hair among "woman"'s called images at least this
    min_hair_called: float = 0.95  # long or short; "none" and "unclear" count against it
    min_scene: dict = dataclasses.field(default_factory=lambda: {"nurse": ("hospital", 0.90),
                                                                 "philosopher": ("library", 0.90)})
    scene_tolerance: float = 0.12  # for scene_words: every scene share within this of the data's
    scene_words: tuple[str, ...] = ("man", "woman", "person")


def expected_shares(class_words: dict[str, list[str]], prompts: dict[str, str]) -> dict[str, dict[str, float]]:
    """Share of long hair and of each scene that the training data teaches each word.

    A word's training images are the images of every class listing it, counted once per
    listing (``man`` appears twice for the class ``man``), with equal images per class.
    """
    counts: dict[str, Counter] = {}
    for class_name, words in class_words.items():
        attributes = attributes_from_prompt(prompts[class_name])
        for word in words:
            counter = counts.setdefault(word, Counter())
            counter["n"] += 1
            counter["long"] += attributes["hair"] == "long"
            counter[attributes["scene"]] += 1
    return {word: {key: c[key] / c["n"] for key in ("long",) + SCENES} for word, c in counts.items()}


def measure(attributes: list[dict[str, str]]) -> dict[str, float]:
    """Shares of the per-image ``portraits.measure_attributes`` calls: hair called (long or
    short; "none" and "unclear" are not), long hair among the called, and each scene plus
    "unclear" over all images (an unclear scene counts against every scene's share)."""
    n = len(attributes)
    with_hair = [a for a in attributes if a["hair"] in ("long", "short")]
    shares = {"n": n, "hair_called": len(with_hair) / n,
              "long": sum(a["hair"] == "long" for a in with_hair) / max(1, len(with_hair)),
              "n_with_hair": len(with_hair), "n_long": sum(a["hair"] == "long" for a in with_hair),
              "hair_unclear": sum(a["hair"] == "unclear" for a in attributes) / n}
    for scene in SCENES + ("unclear",):
        shares[scene] = sum(a["scene"] == scene for a in attributes) / n
    return shares


def bar_failures(word: str, shares: dict[str, float], expected: dict[str, float],
                 bar: AcceptanceBar = AcceptanceBar()) -> list[str]:
    """Which criteria of the acceptance bar a word's measured shares miss (at guidance 1)."""
    failures = []
    if shares["hair_called"] < bar.min_hair_called:
        failures.append(f"hair called {shares['hair_called']:.1%} < {bar.min_hair_called:.0%}")
    if word == "man" and shares["long"] > bar.max_long_man:
        failures.append(f"long hair {shares['long']:.1%} > {bar.max_long_man:.0%}")
    if word == "woman" and shares["long"] < bar.min_long_woman:
        failures.append(f"long hair {shares['long']:.1%} < {bar.min_long_woman:.0%}")
    if word in bar.min_scene:
        scene, minimum = bar.min_scene[word]
        if shares[scene] < minimum:
            failures.append(f"{scene} {shares[scene]:.1%} < {minimum:.0%}")
    if word in bar.scene_words:
        for scene in SCENES:
            if abs(shares[scene] - expected[scene]) > bar.scene_tolerance:
                failures.append(f"{scene} {shares[scene]:.1%} vs {expected[scene]:.0%} expected")
    return failures


def fidelity_row(word: str, guidance: float, attributes: list[dict[str, str]],
                 expected: dict[str, dict[str, float]], bar: AcceptanceBar = AcceptanceBar()) -> dict:
    """Measured shares of one word's samples (their ``measure_attributes``), what its data teaches
    (if it is a training word) and the bar's verdict at guidance 1 ("pass", "FAIL: ..." or "" at
    other scales)."""
    shares = measure(attributes)
    target = expected.get(word)
    failures = bar_failures(word, shares, target, bar) if (target and guidance == 1.0) else []
    return {"word": word, "guidance": guidance, **shares, **{f"expected_{k}": v for k, v in (target or {}).items()},
            "bar": ("pass" if not failures else "FAIL: " + "; ".join(failures)) if guidance == 1.0 else ""}


def format_table(rows: list[dict]) -> str:
    lines = ["| word | guidance | n | hair called | long hair | neutral / hospital / library / unclear | expected long, scenes | bar (guidance 1) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        expected = (f"{r['expected_long']:.0%}, {r['expected_neutral']:.0%} / {r['expected_hospital']:.0%} / "
                    f"{r['expected_library']:.0%}") if "expected_long" in r else "-"
        lines.append(f"| {r['word']} | {r['guidance']:g} | {r['n']} | {r['hair_called']:.0%} | {r['long']:.0%} | "
                     f"{r['neutral']:.0%} / {r['hospital']:.0%} / {r['library']:.0%} / {r['unclear']:.0%} | {expected} | "
                     f"{r['bar']} |")
    return "\n".join(lines)
