"""The bias audit's results (statistical_auditing/audit.py) and its report.md, rendered from them.

audit.py's stages return the dataclasses below; ``write_report`` renders report.md from an
``AuditReport`` that gathers them, one section renderer per part of the report (setup,
the three controls, seen words, unseen words, regression, files).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from bias_begets_bias.fidelity_bar import format_table
from bias_begets_bias.utils import atomic_write_text
from statistical_auditing.from_scratch.sampling import CANDIDATES, METHOD_NAMES, X_VARIANTS


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class WordChoice:
    """The words the audit draws, and what the unseen list left out."""

    seen: list[str]  # the run's training words
    unseen: list[str]  # the unseen words audited (embedding spelling)
    n_usable: int  # unseen words in the embedding before --max_unseen
    missing: list[str]  # listed words not in the embedding (skipped)
    respelled: dict[str, str]  # listed word -> the embedding's spelling of it
    trained: list[str]  # listed words that are training words (reported as seen)
    origin: str  # where the unseen list came from (--words, or the words file's record path)
    every_scale: set[str]  # unseen words drawn at every guidance scale (the others only at the first)
    words_at: dict[float, list[str]]  # guidance -> the words drawn at that scale, seen first
    embedding: dict[str, dict]  # word -> its cosine gaps (audit.embedding_metrics)

    @property
    def all(self) -> list[str]:
        return self.seen + self.unseen


@dataclasses.dataclass
class Control:
    """Control 1: ScoreDecomp's gender accuracy on the held-out test images (audit.accuracy_control)."""

    rows: list[dict]  # one per k: selection and report halves' accuracy, interval and AUC (controls.csv)
    info: dict  # the chosen k, its threshold and report-half accuracy, the test images' counts

    @property
    def k(self) -> int:
        return self.info["k"]

    @property
    def threshold(self) -> float:
        return self.info["threshold"]


@dataclasses.dataclass
class Measured:
    """Every word's images pooled over its seeds, and the tables made from them."""

    rows: list[dict]  # proportions.csv: one per word, scale and method
    seed_rows: list[dict]  # seeds.csv: training words, one per sampling seed and method
    fidelity_rows: list[dict]  # fidelity.csv: control 2, training words (procedural data only)
    agreement: list[dict]  # control 3: ScoreDecomp against the hair rule, training words
    instrument: list[dict]  # instruments.csv: the rules against the second instrument
    grids: dict[float, list[torch.Tensor]]  # guidance -> each word's first images, for the sample grids
    disagreements: list[tuple[str, torch.Tensor]]  # (caption, images) the rules and the classifier call apart


@dataclasses.dataclass
class Verdicts:
    """The controls' sentences for the report and the failures that mark it."""

    accuracy: str  # control 1
    fidelity: str = ""  # control 2 ("" without the attribute rules)
    agreement: str = ""  # control 3 ("" without the attribute rules)
    failed: list[str] = dataclasses.field(default_factory=list)  # failed controls, in words


@dataclasses.dataclass
class AuditReport:
    """What report.md is rendered from."""

    cfg: dict  # the audit's flags
    run: Any  # pipeline.TrainedRun
    run_name: str  # the run folder as the records name it
    dataset: str  # the dataset folder as the records name it
    source: str  # the dataset's source ("" when unknown)
    device: Any  # the device the model ran on
    guidances: list[float]
    methods: list[str]  # gender calls: scoredecomp, then attribute and elbo where used
    timestep: int  # the timestep t of the audit's k
    words: WordChoice
    control: Control
    measured: Measured
    verdicts: Verdicts
    attribute_note: str  # why the attribute rules were skipped ("" when they ran)
    instrument_info: dict  # the second instrument's test accuracy and confidence ({} without it)
    fits: list[dict]  # regression.csv rows, with "plot" where a plot was drawn
    bar_plots: dict[float, list[str]]  # guidance -> the share plots drawn
    sampled: int  # sample sets drawn now
    cached: int  # sample sets read from the cache
    stage_seconds: dict[str, float]  # the Timer's stages (the same dict: stages that end later count too)


# ----------------------------------------------------------------------------- report
def fmt_share(row: dict | None) -> str:
    if row is None:
        return "-"
    if not row["n"]:
        return f"n/a (0 of {row['n'] + row.get('n_undetermined', 0)} decided)"
    return f"{row['share']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] ({row['successes']}/{row['n']})"


def _ci(low: float, high: float, spec: str = ".3g") -> str:
    return f"[{low:{spec}}, {high:{spec}}]"


def _introduction(report: AuditReport) -> list[str]:
    """Title, what the audit asks and how it calls gender, and the controls' overall verdict."""
    cfg, run = report.cfg, report.run
    n_seen = cfg["n_seeds"] * cfg["n_per_seed"]
    lines = [f"# Bias audit of `{report.run_name}`", ""]
    lines += [
        "The model was trained on gender-balanced images, each image with the words of its class "
        f"({', '.join(run.words)}), through a word embedding that may itself be gender-biased. This audit "
        f"asks whether the embedding's bias reaches the images: it draws {n_seen} images per training word "
        f"({cfg['n_seeds']} sampling seeds x {cfg['n_per_seed']}) and {cfg['n_per_word']} per unseen word at each "
        "guidance scale, and counts how many show a woman (female-presenting: long hair in these portraits) or a "
        "man (short hair). The gender of an image is called by the **hair rule** (hair length measured from the "
        "pixels; exact on the renders; blurred or hybrid samples are \"unclear\" and left out of the share), by "
        "**ScoreDecomp** (the model's own view: the weights w of eps(x_t, base) ~ w_man eps(x_t, man) + w_woman "
        "eps(x_t, woman), w >= 0, sum 1, at the image's noised version x_t"
        + ("; the call is calibrated: female when w_woman - w_man exceeds a threshold chosen on held-out labelled "
           "images" if cfg["call"] == "calibrated" else "; female when w_woman > w_man") + ")"
        + (", and by the **ELBO classifier**" if cfg["elbo"] else "")
        + ". Every share comes with its 95% Wilson interval. The controls come first: a metric that fails "
        "them is wrong, and unseen-word results of a model that fails them must not be trusted.", ""]
    failed = report.verdicts.failed
    lines += ["**Controls: " + ("all passed.**" if not failed else
                                "FAILED: " + "; ".join(failed) + ". Treat the results below with "
                                "suspicion.**"), ""]
    return lines


def _setup(report: AuditReport) -> list[str]:
    """The settings table: run, embedding, data, sampler, ScoreDecomp, seeds, device, samples, time."""
    cfg, run, info = report.cfg, report.run, report.control.info
    lines = ["## Setup", "", "| setting | value |", "|---|---|"]
    setup = [
        ("run", f"`{report.run_name}`, training step {run.step}"),
        ("embedding", f"{run.config['embedding']}, debias: {run.config['debias']}, JL seed "
                      f"{run.config['jl_seed']} ({run.jl_matrix.shape[0]} -> {run.jl_matrix.shape[1]} dims)"),
        ("dataset", f"`{report.dataset}` (source: {report.source or 'unknown'})"),
        ("sampler", f"{cfg['sampler']}, {cfg['sample_steps']} steps, guidance scales "
                    f"{', '.join(f'{g:g}' for g in report.guidances)}"),
        ("ScoreDecomp", f"k = {report.control.k} (timestep t = {report.timestep}; {info['k_origin']}; "
                        f"{cfg['num_inference_steps']} inference steps), candidates {' / '.join(CANDIDATES)}, base = "
                        + (f"the word itself (\"{cfg['control_base']}\" for the candidate words)"
                           if cfg["scoredecomp_base"] == "word" else f"\"{cfg['scoredecomp_base']}\" for every word")
                        + f", call: {cfg['call']}"
                        + (f" (threshold {info['threshold']:+.4f})" if cfg["call"] == "calibrated" else "")),
        ("ELBO classifier", f"{cfg['elbo_samples']} timesteps per image" if cfg["elbo"] else "off"),
        ("seeds", f"base seed {cfg['seed']}; sampling seeds and per-image noise keys derived from it "
                  f"(bias_begets_bias.utils.derived_seed); bootstrap seed {cfg['seed']}, {cfg['n_boot']} "
                  f"resamples"),
        ("device", str(report.device)),
        ("samples", f"{report.sampled} sample sets sampled now, {report.cached} read from the cache"),
        ("time per stage", ", ".join(f"{name} {sec:.0f} s" for name, sec in report.stage_seconds.items())),
    ]
    return lines + [f"| {k} | {v} |" for k, v in setup] + [""]


def _control_accuracy(report: AuditReport) -> list[str]:
    """Control 1: ScoreDecomp's accuracy per k on the selection and report halves, and the calibrated call."""
    cfg, info, k = report.cfg, report.control.info, report.control.k
    lines = ["## Controls", "", "### 1. ScoreDecomp gender accuracy on held-out labelled images", ""]
    lines += [f"{info['n_images']} test images of `{info['test_folder']}` ({info['n_female']} female, "
              f"{info['n_male']} male; labels from the class words), split alternately into a selection half (k is "
              f"chosen there) and a report half (the accuracy reported for that k). Base \"{cfg['control_base']}\", "
              "candidates \"man\" / \"woman\"; every k uses the same noise per image (keyed by the image id). AUC: "
              "how well w_woman - w_man separates the genders whatever the threshold.", "",
              "| k | t | selection: accuracy (AUC) | report: accuracy [95% CI] | report: AUC |", "|---|---|---|---|---|"]
    for r in report.control.rows:
        mark = " **(used)**" if r["k"] == k else ""
        lines.append(f"| {r['k']}{mark} | {r['t']} | {r['selection_accuracy']:.3f} ({r['selection_auc']:.3f}) | "
                     f"{r['report_accuracy']:.3f} {_ci(r['report_ci_low'], r['report_ci_high'])} | "
                     f"{r['report_auc']:.3f} |")
    lines += ["", report.verdicts.accuracy, "",
              f"Calibrated call at k = {k}: threshold {info['threshold']:+.4f} on w_woman - w_man (chosen on "
              f"the selection half), accuracy {info['calibrated_accuracy']:.3f} "
              f"{_ci(info['calibrated_ci_low'], info['calibrated_ci_high'])} on the report half.", "",
              "![accuracy by k](controls.png)", ""]
    return lines


def _control_fidelity(report: AuditReport) -> list[str]:
    """Control 2: the training words' hair and scene against what the data teaches them."""
    lines = ["### 2. Does the model obey its conditioning? (training words, attribute rules, the audit's sampler)", ""]
    if report.measured.fidelity_rows:
        n_seen = report.cfg["n_seeds"] * report.cfg["n_per_seed"]
        lines += [f"Hair and scene of each training word's {n_seen} samples per scale, measured by the attribute "
                  "rules, against what the training data teaches the word and the acceptance bar at guidance 1 "
                  "(diffusion_from_scratch/fidelity.py). Hair called = long or short (not none, not unclear); "
                  "scene shares are over all images, so unclear scenes count against the bar.", "",
                  format_table(report.measured.fidelity_rows), "", report.verdicts.fidelity, ""]
    else:
        lines += [report.attribute_note, ""]
    return lines


def _control_instruments(report: AuditReport) -> list[str]:
    """Control 3: ScoreDecomp against the hair rule, and the rules against the second instrument."""
    measured, info = report.measured, report.instrument_info
    lines = [f"### 3. Instruments: ScoreDecomp against the hair rule (tolerance "
             f"{report.cfg['agreement_tolerance']:.0%}), and the rules against a second instrument", ""]
    if measured.agreement:
        lines += ["Both methods on the same images: the samples the hair rule calls long or short.", "",
                  "| word | guidance | hair rule | ScoreDecomp | difference | agree |", "|---|---|---|---|---|---|"]
        for a in measured.agreement:
            compared = not math.isnan(a["difference"])
            difference = f"{a['difference']:+.2f}" if compared else "n/a"
            agree = "yes" if a["agree"] else ("**NO**" if compared else "**NO** (nothing to compare)")
            lines.append(f"| {a['word']} | {a['guidance']:g} | {fmt_share(a['attribute'])} | "
                         f"{fmt_share(a['scoredecomp'])} | {difference} | {agree} |")
        lines += ["", report.verdicts.agreement, ""]
    if measured.instrument:
        lines += ["The attribute rules against a small CNN trained on the renders' ground truth (test-render "
                  f"accuracy: hair {info['test_accuracy_hair']:.3f}, scene {info['test_accuracy_scene']:.3f}; "
                  f"unclear below probability {info['confident']:g}): share of images on which both give the same "
                  "call (including unclear), and Cohen's kappa.", "",
                  "| word | guidance | attribute | agreement | kappa | rule | classifier |", "|---|---|---|---|---|---|---|"]
        for r in measured.instrument:
            lines.append(f"| {r['word']} | {r['guidance']:g} | {r['attribute']} | {r['agreement']:.2f} | "
                         f"{r['kappa']:.2f} | {r['rule_counts']} | {r['classifier_counts']} |")
        lines += ["", "Images on which the rule and the classifier disagree (each row: a word and scale; caption in "
                  "instruments.csv):", "", "![disagreements](instrument_disagreements.png)", ""]
    elif report.attribute_note:
        lines += [report.attribute_note, ""]
    return lines


def _share_table(report: AuditReport, words: list[str], guidance: float) -> list[str]:
    """Each word's cosine gaps and its female share by every method at one guidance scale."""
    methods = report.methods
    by_key = {(r["word"], r["guidance"], r["method"]): r for r in report.measured.rows}
    header = "| word | gap word2vec | gap before JL | gap after JL | " + " | ".join(
        f"{METHOD_NAMES[m]}: female share [95% CI] (female/n)" for m in methods) + " |"
    table = [header, "|" + "---|" * (4 + len(methods))]
    for word in words:
        e = report.words.embedding[word]
        cells = [fmt_share(by_key.get((word, guidance, m))) for m in methods]
        table.append(f"| {word} | {e['cosine_gap_w2v']:+.3f} | {e['cosine_gap']:+.3f} | {e['cosine_gap_jl']:+.3f} | "
                     + " | ".join(cells) + " |")
    return table


def _seen_words(report: AuditReport) -> list[str]:
    """The training words' shares per scale, and their seed-to-seed spread."""
    cfg = report.cfg
    lines = ["## Seen words", "", "The training words; each was trained on the images of every class listing "
             "it (data/class_words.json), so \"person\", \"nurse\" and \"philosopher\" saw equal numbers of "
             f"men and women. Shares pooled over {cfg['n_seeds']} sampling seeds; seed-to-seed spread in "
             "seeds.csv and below. Cosine gap = cos(w, woman) - cos(w, man) (> 0: nearer \"woman\").", ""]
    for guidance in report.guidances:
        lines += [f"Guidance {guidance:g}:", ""] + _share_table(report, report.run.words, guidance) + [""]
    lines += ["Seed-to-seed spread (female share per seed; p of the chi-square test that the seeds agree):", "",
              "| word | guidance | method | per seed | sd | p |", "|---|---|---|---|---|---|"]
    for r in report.measured.rows:
        if r["seen"] and r["n_seeds"]:
            per_seed = ", ".join(f"{s['share']:.2f}" for s in report.measured.seed_rows
                                 if (s["word"], s["guidance"], s["method"]) == (r["word"], r["guidance"], r["method"])
                                 and s["n"])
            lines.append(f"| {r['word']} | {r['guidance']:g} | {METHOD_NAMES[r['method']]} | {per_seed} | "
                         f"{r['seed_sd']:.3f} | {r['homogeneity_p']:.3g} |")
    return lines + [""]


def _unseen_words(report: AuditReport) -> list[str]:
    """Where the unseen words came from, what was left out, their shares per scale, plots and grids."""
    cfg, words = report.cfg, report.words
    lines = ["## Unseen words", ""]
    how = ("at evenly spaced ranks of the cosine gap in the original embedding, so every arm and JL seed audits "
           "the same words" if cfg["unseen_pick"] == "spread" else "in file order")
    chosen = (f" (--max_unseen {cfg['max_unseen']} of {words.n_usable} usable words, chosen {how})"
              if words.n_usable > len(words.unseen) else "")
    lines += [f"Words from {words.origin}: {len(words.unseen)} audited{chosen}.", ""]
    if words.missing:
        lines += [f"Skipped, not in the embedding {report.run.config['embedding']!r} ({len(words.missing)}): "
                  + ", ".join(words.missing) + ".", ""]
    if words.respelled:
        lines += ["Found in the embedding under another spelling: "
                  + ", ".join(f"{a} -> {b}" for a, b in words.respelled.items()) + ".", ""]
    if words.trained:
        lines += ["Listed but trained on, so reported under Seen words: " + ", ".join(words.trained) + ".", ""]
    for guidance in report.guidances:
        if words.unseen:
            lines += [f"Guidance {guidance:g}:", ""] + _share_table(report, words.unseen, guidance) + [""]
        for plot in report.bar_plots.get(guidance, []):
            lines += [f"![female share, guidance {guidance:g}]({plot})", ""]
    lines += ["Sample grids (first images of each word, one row per word):", ""]
    return lines + [f"![samples, guidance {g:g}](samples_g{g:g}.png)" for g in report.guidances] + [""]


def _regression(report: AuditReport) -> list[str]:
    """The slope and R^2 of the share on each embedding-bias measure, per scale and method, and their plots."""
    lines = ["## Regression", "", "Least-squares line of each unseen word's female share on its embedding bias, "
             f"per method and guidance scale; 95% intervals from {report.cfg['n_boot']} pairs-bootstrap resamples of "
             "the words. A regressor without spread (e.g. a gap that hard-debiasing set to 0) has no slope: undefined.",
             "", "| guidance | method | x | words | slope [95% CI] | R^2 [95% CI] |", "|---|---|---|---|---|---|"]
    for f in report.fits:
        if f["defined"]:
            lines.append(f"| {f['guidance']:g} | {METHOD_NAMES[f['method']]} | {X_VARIANTS[f['x']].run} | "
                         f"{f['n_words']} | {f['slope']:.3g} {_ci(f['slope_ci_low'], f['slope_ci_high'])} | "
                         f"{f['r2']:.3f} {_ci(f['r2_ci_low'], f['r2_ci_high'], '.3f')} |")
        else:
            lines.append(f"| {f['guidance']:g} | {METHOD_NAMES[f['method']]} | {X_VARIANTS[f['x']].run} | "
                         f"{f['n_words']} | undefined: {f['reason']} | |")
    return lines + [""] + [f"![{f['method']} {f['x']} guidance {f['guidance']:g}]({f['plot']})"
                           for f in report.fits if "plot" in f]


def write_report(out: Path, report: AuditReport) -> None:
    """report.md: introduction, setup, the three controls, seen words, unseen words, regression, files."""
    lines = (_introduction(report) + _setup(report) + _control_accuracy(report) + _control_fidelity(report)
             + _control_instruments(report) + _seen_words(report) + _unseen_words(report) + _regression(report))
    lines += ["", "## Files", "", "proportions.csv, seeds.csv, controls.csv, fidelity.csv, instruments.csv, "
              "regression.csv, audit.json, samples/ (cached images, reused by a rerun with the same settings).", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
