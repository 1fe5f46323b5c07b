"""Whose bias is it? Split each unseen profession's female share into the word's own part, the
JL draw's, the training draw's and sampling noise, per arm, from the kept runs of a crossed design
(results/whose_bias/README.md: arms x JL seeds x training seeds, every run audited on the same words).

    python statistical_auditing/whose_bias.py --runs results/whose_bias/runs --out results/whose_bias/analysis

Reads each run's config.json (arm = its debias mode, JL seed, training seed), audit/proportions.csv
(successes of n images per word, at --guidance with --method) and records.json (the commits). The
estimators are those of statistical_auditing/from_scratch/variance_components.py: ANOVA components
with word-resampling intervals, slopes / R^2 / the fraction of the word component that a predictor
explains (word2vec's cosine gap; Gonen & Goldberg's bias-by-neighbours in the vectors the arm gives
the model), paired differences between arms and between components, per-run t-intervals, repeated
cross-validation. Writes report.md, CSVs and PNGs to --out; every number is a function of the runs
and the flags (the bootstraps are seeded).
"""
from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path

import numpy as np

from bias_begets_bias.cli import config_from_constants, constants_of, require, run_main
from bias_begets_bias.pipeline import read_run_config, training_recipe
from bias_begets_bias.utils import (atomic_write_text, claim_analysis_folder, compact_csv_text, load_json,
                                    read_csv_table, record_path)
from bias_begets_bias.word_vectors import ARM_DEBIAS
from statistical_auditing.core.stats import ols
from statistical_auditing.from_scratch import variance_components as vc
from statistical_auditing.from_scratch.experiment_stats import x_has_spread

# ----------------------------------------------------------------------------- config
RUNS = "results/whose_bias/runs"  # folder of kept runs (<run>/config.json, <run>/audit/proportions.csv)
OUT = "results/whose_bias/analysis"  # output folder: report.md, CSVs, PNGs
ARMS = ""  # comma list of the arms to analyse (w2v, debiased, projected); empty = every arm in --runs
WORDS = ""  # unseen words to analyse: a comma list, or a CSV file with a "word" column; empty = every word every run audited
METHOD = "scoredecomp"  # audit method whose female calls are analysed: scoredecomp | attribute
GUIDANCE = 1.0  # (0, inf) audit guidance scale analysed
N_BOOT = 2000  # [1, inf) bootstrap resamples of every interval
SEED = 0  # [0, 2**63) seed of the bootstraps and of the cross-validation splits
LEVEL = 0.95  # (0, 1) confidence level of every interval
NEIGHBOURS = 100  # [1, inf) k of bias-by-neighbours (Gonen & Goldberg 2019 use 100)
VOCABULARY = 0  # [0, inf) neighbours among the first N words of the embedding (its frequency order; 0 = all)
CV_REPEATS = 200  # [1, inf) repeats of the 2-fold cross-validation of the word effects on word2vec's gap

ARM_OF_DEBIAS = {debias: arm for arm, debias in ARM_DEBIAS.items()}
# word_x_train: what a training seed carries across JL matrices (the crossed model's term);
# train_within_jl: everything particular to one training given its matrix (word_x_train + interaction);
# word_x_run: word_x_jl + train_within_jl, the trained model's part beside the word's
COMPONENTS = ("word", "word_x_jl", "word_x_train", "interaction", "train_within_jl", "word_x_run", "sampling")


@dataclasses.dataclass
class Run:
    name: str
    folder: Path
    arm: str
    jl_seed: int
    train_seed: int
    config: dict
    unseen: dict[str, dict]  # word -> its proportions.csv row at the analysed method and guidance
    seen: dict[str, dict]
    commits: list[str]


@dataclasses.dataclass
class Arm:
    """One arm's runs on a complete grid: shares[w, j, t] of words x JL seeds x training seeds."""
    name: str
    runs: list[list[Run]]  # [j][t]
    words: list[str]
    shares: np.ndarray
    n: np.ndarray
    w2v_gap: np.ndarray  # word2vec's cosine gap cos(w, woman) - cos(w, man) per word, the same in every run
    jl_gap: np.ndarray  # the gap after the run's JL projection (and debiasing), [w, j, t]


# ----------------------------------------------------------------------------- loading


def load_run(folder: Path, method: str, guidance: float) -> Run:
    config = read_run_config(folder / "config.json")
    rows = read_csv_table(folder / "audit" / "proportions.csv",
                          ("word", "seen", "guidance", "method", "n", "successes", "cosine_gap_w2v", "cosine_gap_jl"))
    chosen = [r for r in rows if r["method"] == method and math.isclose(float(r["guidance"]), guidance)]
    require(bool(chosen), f"{folder / 'audit' / 'proportions.csv'}: no rows of method {method!r} at guidance "
                          f"{guidance:g}; check --method and --guidance (the audit's --guidance lists its scales)")
    records = load_json(folder / "records.json") if (folder / "records.json").is_file() else {}
    commits = sorted({str(start.get("commit")) for record in records.values() for start in record.get("starts", [])
                      if start.get("commit")})
    debias = str(config.get("debias"))
    require(debias in ARM_OF_DEBIAS, f"{folder / 'config.json'}: debias {debias!r} is none of {', '.join(ARM_OF_DEBIAS)}")
    return Run(name=folder.name, folder=folder, arm=ARM_OF_DEBIAS[debias], jl_seed=int(config["jl_seed"]),
               train_seed=int(config["train"]["seed"]), config=config,
               unseen={r["word"]: r for r in chosen if r["seen"] != "True"},
               seen={r["word"]: r for r in chosen if r["seen"] == "True"}, commits=commits)


def load_runs(runs_folder: Path, method: str, guidance: float) -> list[Run]:
    require(runs_folder.is_dir(), f"--runs: {runs_folder} is not a folder (expected a folder of kept runs)")
    folders = sorted(p for p in runs_folder.iterdir() if (p / "config.json").is_file())
    require(bool(folders), f"--runs: {runs_folder} holds no run (no <run>/config.json)")
    runs = [load_run(folder, method, guidance) for folder in folders]
    seen_identity: dict[tuple, str] = {}
    for run in runs:
        identity = (run.arm, run.jl_seed, run.train_seed)
        require(identity not in seen_identity, f"--runs: {run.name} and {seen_identity.get(identity)} are the same "
                                               f"run (arm {run.arm}, JL seed {run.jl_seed}, training seed {run.train_seed})")
        seen_identity[identity] = run.name
    recipes = {run.name: training_recipe(run.config) for run in runs}
    first = runs[0].name
    for name, recipe in recipes.items():
        differing = sorted(k for k in set(recipe) | set(recipes[first]) if recipe.get(k) != recipes[first].get(k))
        require(not differing, f"--runs: {name} was trained with another recipe than {first} "
                               f"(differs in {', '.join(differing[:5])}); analyse one recipe at a time")
    return runs


def select_arms(runs: list[Run], arms: str) -> list[Run]:
    """The runs of the chosen arms (all with an empty choice): an arm still in progress can be left
    out while the complete ones are analysed."""
    if not arms:
        return runs
    chosen = [a.strip() for a in arms.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in ARM_DEBIAS]
    require(not unknown, f"--arms: unknown arm(s) {', '.join(unknown)}; expected a comma list of "
                         f"{', '.join(ARM_DEBIAS)}")
    present = {run.arm for run in runs}
    absent = [a for a in chosen if a not in present]
    require(not absent, f"--arms: no run of arm(s) {', '.join(absent)} in --runs "
                        f"(it holds {', '.join(sorted(present))})")
    return [run for run in runs if run.arm in chosen]


def common_words(runs: list[Run]) -> tuple[list[str], list[str]]:
    """Unseen words every run audited (in the first run's order) and those some run lacks."""
    order = list(runs[0].unseen)
    everywhere = set.intersection(*(set(run.unseen) for run in runs))
    return [w for w in order if w in everywhere], sorted(set().union(*(run.unseen for run in runs)) - everywhere)


def select_words(words: list[str], choice: str) -> list[str]:
    """The chosen unseen words (all with an empty choice), in the runs' order. ``choice`` is a comma
    list, or a CSV file whose "word" column lists them (e.g. results/experiment/unseen.csv: the 20
    professions of the first design); every chosen word must have been audited in every run."""
    if not choice:
        return words
    path = Path(choice)
    if path.suffix == ".csv":
        require(path.is_file(), f"--words: {choice} is not a file (expected a CSV with a 'word' column, or a comma list)")
        chosen = list(dict.fromkeys(row["word"] for row in read_csv_table(path, ("word",))))
    else:
        chosen = list(dict.fromkeys(w.strip() for w in choice.split(",") if w.strip()))
    audited, wanted = set(words), set(chosen)
    missing = [w for w in chosen if w not in audited]
    require(not missing, f"--words: not an unseen word audited in every run: {', '.join(missing)}")
    return [w for w in words if w in wanted]


def build_arm(name: str, runs: list[Run], words: list[str]) -> Arm:
    jls = sorted({run.jl_seed for run in runs})
    trains = sorted({run.train_seed for run in runs})
    by_cell = {(run.jl_seed, run.train_seed): run for run in runs}
    missing = [f"JL {j} x training {t}" for j in jls for t in trains if (j, t) not in by_cell]
    require(not missing, f"--runs: arm {name} is not a complete grid of JL seeds {jls} x training seeds {trains}: "
                         f"missing {', '.join(missing)}")
    require(len(jls) >= 2 and len(trains) >= 2, f"--runs: arm {name} has JL seeds {jls} and training seeds {trains}; "
                                                f"the decomposition needs at least 2 of each")
    grid = [[by_cell[(j, t)] for t in trains] for j in jls]
    cells = lambda key: np.array([[[float(run.unseen[w][key]) for run in row] for row in grid] for w in words])  # noqa: E731
    successes, n = cells("successes"), cells("n")
    w2v = cells("cosine_gap_w2v")
    require(float(np.abs(w2v - w2v[:, :1, :1]).max()) < 1e-5,
            f"--runs: arm {name}'s runs disagree on word2vec's gap of a word (cosine_gap_w2v); were they audited "
            f"with the same embedding?")
    return Arm(name=name, runs=grid, words=words, shares=successes / n, n=n, w2v_gap=w2v[:, 0, 0],
               jl_gap=cells("cosine_gap_jl"))


# ----------------------------------------------------------------------------- predictors


def neighbour_bias(arm: Arm, k: int, vocabulary: int) -> np.ndarray:
    """Gonen & Goldberg's bias-by-neighbours of each word in the vectors the arm gives the model
    (its conditioning: JL-projected, debiased before or after), averaged over the arm's JL draws;
    neighbours among the embedding's vocabulary, labelled female or male by the original word2vec."""
    from bias_begets_bias.word_vectors import conditioning_table, jl_matrix, load_word_vectors

    config = arm.runs[0][0].config
    wv = load_word_vectors(config["embedding"])
    keys = list(wv._index)[:vocabulary or None]
    extra = [w for w in arm.words if w not in set(keys)]  # phrases ("bus driver") are no vocabulary key
    vocab = keys + extra
    original = wv.units(vocab)
    female = vc.female_side_from_direction(dict(zip(vocab, original)), wv.gender_direction)
    shares = []
    for row in arm.runs:
        matrix = jl_matrix(wv.dim, int(config["jl_dim"]), row[0].jl_seed)
        table = conditioning_table(vocab, wv, matrix, row[0].config["debias"])
        by_word = vc.bias_by_neighbours(dict(zip(vocab, table)), arm.words, female, k)
        shares.append([by_word[w] for w in arm.words])
    return np.mean(shares, axis=0)


def per_run_fits(arm: Arm) -> list[dict]:
    """Each run's least-squares slope and R^2 of its word shares on its own after-JL gap; NaN where
    that gap has no spread (``x_has_spread``: debiasing after the projection makes it 0 up to float
    rounding)."""
    rows = []
    for j, row in enumerate(arm.runs):
        for t, run in enumerate(row):
            y, gap = arm.shares[:, j, t], arm.jl_gap[:, j, t]
            slope, _, r2 = ols(gap, y) if x_has_spread(gap) else (math.nan, math.nan, math.nan)
            rows.append({"arm": arm.name, "run": run.name, "jl_seed": run.jl_seed, "train_seed": run.train_seed,
                         "slope_after_jl": slope, "r2_after_jl": r2, "mean_share": float(y.mean())})
    return rows


# ----------------------------------------------------------------------------- the analysis


@dataclasses.dataclass
class ArmResult:
    arm: Arm
    components: dict
    effects: dict
    on_w2v: dict
    on_neighbours: dict
    neighbours: np.ndarray
    per_run: list[dict]
    per_run_t: dict[str, dict]
    cv: dict
    jl_vs_train: dict  # word x JL minus word x training, crossed (what a training seed carries across matrices)
    jl_vs_train_within: dict  # word x JL minus the training draw nested in the JL draw


def per_run_t(per_run: list[dict], key: str, level: float) -> dict:
    """The t-interval over runs of a per-run statistic; mean NaN and no interval where a run has none."""
    values = [row[key] for row in per_run]
    if not all(math.isfinite(v) for v in values):
        return {"mean": math.nan, "ci": ("", ""), "k": len(values)}
    return vc.per_run_t_interval(values, level)


def analyse_arm(arm: Arm, cfg: dict) -> ArmResult:
    boot = dict(n_boot=cfg["n_boot"], seed=cfg["seed"], level=cfg["level"])
    effects = vc.word_effects(arm.shares, arm.n)
    neighbours = neighbour_bias(arm, cfg["neighbours"], cfg["vocabulary"])
    per_run = per_run_fits(arm)
    return ArmResult(
        arm=arm, components=vc.decompose(arm.shares, arm.n, resample="words", **boot), effects=effects,
        on_w2v=vc.slope_on_predictor(arm.shares, arm.w2v_gap, **boot),
        on_neighbours=vc.slope_on_predictor(arm.shares, neighbours, **boot), neighbours=neighbours, per_run=per_run,
        per_run_t={key: per_run_t(per_run, key, cfg["level"]) for key in ("slope_after_jl", "r2_after_jl")},
        cv=vc.repeated_cv_r2(arm.w2v_gap, effects["effect"], folds=2, repeats=cfg["cv_repeats"], seed=cfg["seed"],
                             level=cfg["level"]),
        jl_vs_train=vc.component_difference(arm.shares, "word_x_jl", key_b="word_x_train", **boot),
        jl_vs_train_within=vc.component_difference(arm.shares, "word_x_jl", key_b="train_within_jl", n=arm.n, **boot))


def arm_differences(results: dict[str, ArmResult], cfg: dict) -> list[dict]:
    """Paired over words: every arm against the first (w2v), and projected against debiased."""
    boot = dict(n_boot=cfg["n_boot"], seed=cfg["seed"], level=cfg["level"])
    names = list(results)
    pairs = [(a, names[0]) for a in names[1:]]
    if {"projected", "debiased"} <= set(names):
        pairs.append(("projected", "debiased"))
    rows = []
    for a, b in pairs:
        ya, yb = results[a].arm.shares, results[b].arm.shares
        if ya.shape[1:] != yb.shape[1:]:
            continue  # the paired resamples need the same JL x training layout
        tests = [("word variance", vc.paired_difference(ya, None, yb, None, statistic="word_variance", **boot)),
                 ("slope on word2vec's gap", vc.paired_difference(ya, results[a].arm.w2v_gap, yb,
                                                                  results[b].arm.w2v_gap, **boot)),
                 ("word x JL variance", vc.component_difference(ya, "word_x_jl", yb, **boot)),
                 ("word x training variance", vc.component_difference(ya, "word_x_train", yb, **boot)),
                 ("training-within-JL variance", vc.component_difference(
                     ya, "train_within_jl", yb, n=results[a].arm.n, n_b=results[b].arm.n, **boot))]
        for what, result in tests:
            rows.append({"contrast": f"{a} - {b}", "statistic": what, "difference": result["difference"],
                         "a": result["a"], "b": result["b"], "ci_low": result["ci"][0], "ci_high": result["ci"][1]})
    return rows


def seen_rows(arms: dict[str, Arm], runs: list[Run], level: float) -> list[dict]:
    """Each seen word's share per arm: the runs' mean with a t-interval over runs (each run's
    sampling noise is its own), beside the pooled share of all its images."""
    rows = []
    for name in arms:
        arm_runs = [run for row in arms[name].runs for run in row]
        for word in sorted(set.intersection(*(set(run.seen) for run in arm_runs))):
            cells = [run.seen[word] for run in arm_runs]
            shares = [float(c["successes"]) / float(c["n"]) for c in cells]
            t = vc.per_run_t_interval(shares, level)
            rows.append({"arm": name, "word": word, "runs": len(cells), "mean_share": t["mean"],
                         "ci_low": max(t["ci"][0], 0.0), "ci_high": min(t["ci"][1], 1.0),  # a share is in [0, 1]
                         "run_min": min(shares), "run_max": max(shares),
                         "pooled_share": sum(float(c["successes"]) for c in cells) / sum(float(c["n"]) for c in cells),
                         "images": int(sum(float(c["n"]) for c in cells))})
    return rows


# ----------------------------------------------------------------------------- tables


def component_rows(results: dict[str, ArmResult]) -> list[dict]:
    rows = []
    for name, result in results.items():
        comp = result.components
        for key in COMPONENTS:
            low, high = comp["intervals"][f"sd_{key}"]
            rows.append({"arm": name, "component": key, "variance": comp["variance"][key], "sd": comp["sd"][key],
                         "sd_ci_low": low, "sd_ci_high": high})
        low, high = comp["intervals"]["word_share"]
        rows.append({"arm": name, "component": "word_share", "variance": "", "sd": comp["word_share"],
                     "sd_ci_low": low, "sd_ci_high": high})
    return rows


def predictor_rows(results: dict[str, ArmResult]) -> list[dict]:
    rows = []
    for name, result in results.items():
        for predictor, fit in (("word2vec gap", result.on_w2v), ("bias-by-neighbours", result.on_neighbours)):
            rows.append({"arm": name, "predictor": predictor, "slope": fit["slope"], "slope_ci_low": fit["slope_ci"][0],
                         "slope_ci_high": fit["slope_ci"][1], "r2": fit["r2"], "r2_ci_low": fit["r2_ci"][0],
                         "r2_ci_high": fit["r2_ci"][1], "fraction": fit["fraction_of_word_variance_explained"],
                         "fraction_ci_low": fit["fraction_ci"][0], "fraction_ci_high": fit["fraction_ci"][1]})
        for key, t in result.per_run_t.items():
            rows.append({"arm": name, "predictor": f"after-JL gap, per run ({key}: mean of {t['k']} runs, t-interval)",
                         "slope" if key.startswith("slope") else "r2": t["mean"],
                         "slope_ci_low" if key.startswith("slope") else "r2_ci_low": t["ci"][0],
                         "slope_ci_high" if key.startswith("slope") else "r2_ci_high": t["ci"][1]})
        rows.append({"arm": name, "predictor": "word2vec gap, held-out (repeated 2-fold CV; range over splits)",
                     "r2": result.cv["r2"], "r2_ci_low": result.cv["ci"][0], "r2_ci_high": result.cv["ci"][1]})
    return rows


def word_rows(results: dict[str, ArmResult]) -> list[dict]:
    rows = []
    for name, result in results.items():
        arm = result.arm
        for i, word in enumerate(arm.words):
            rows.append({"arm": name, "word": word, "mean_share": float(arm.shares[i].mean()),
                         "effect": float(result.effects["effect"][i]), "se": float(result.effects["se"][i]),
                         "shrunk": float(result.effects["shrunk"][i]), "w2v_gap": float(arm.w2v_gap[i]),
                         "mean_jl_gap": float(arm.jl_gap[i].mean()), "bias_by_neighbours": float(result.neighbours[i])})
    return rows


def command_line(cfg: dict) -> str:
    """The command that made the report: every flag, the folders relative to the repository
    where they lie in it (record_path), so a reader re-runs it as written."""
    flags = {key: record_path(Path(value)) if key in ("runs", "out") or (key == "words" and value.endswith(".csv"))
             else value for key, value in cfg.items()}
    return shlex.join(["python", "statistical_auditing/whose_bias.py",
                       *(part for key, value in flags.items() for part in (f"--{key}", f"{value:g}" if isinstance(
                           value, float) else str(value)))])


def fmt_ci(value: float, low, high, spec: str = ".3f") -> str:
    if isinstance(value, float) and math.isnan(value):
        return "not defined"  # e.g. the fraction of a word variance estimated at <= 0
    if low == "" or value == "":
        return format(value, spec) if value != "" else ""
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


# ----------------------------------------------------------------------------- report


def markdown_table(rows: list[dict], columns: list[tuple[str, callable]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return lines


def render_report(results: dict[str, ArmResult], runs: list[Run], dropped: list[str], tables: dict, cfg: dict,
                  out: Path) -> str:
    level = f"{cfg['level']:.0%}"
    words = next(iter(results.values())).arm.words
    commits = sorted({c for run in runs for c in run.commits})
    lines = [f"# Whose bias is it? Variance components of {len(words)} unseen words, {len(runs)} runs", "",
             f"`{command_line(cfg)}`",
             "", f"Runs (commits {', '.join(c[:7] for c in commits) or 'not recorded'}): "
             + ", ".join(f"{r.name} ({r.arm}, JL {r.jl_seed}, training {r.train_seed})" for r in runs) + ".",
             (f"Words: the {len(words)} unseen words chosen by --words" if cfg["words"] else
              f"Words: the {len(words)} unseen words every run audited"
              + (f"; left out (not in every run): {', '.join(dropped)}" if dropped else "")) + ".",
             f"Female share by {cfg['method']} at guidance {cfg['guidance']:g}. Intervals: {level} percentile, "
             f"{cfg['n_boot']} resamples redrawing words jointly across runs (components; pigeonhole for slopes and "
             f"R^2); per-run t-intervals where marked.", "", "## Components (sd, share scale)", ""]
    lines += markdown_table(tables["components"], [
        ("arm", lambda r: r["arm"]), ("component", lambda r: r["component"]),
        ("sd [interval]", lambda r: fmt_ci(r["sd"], r["sd_ci_low"], r["sd_ci_high"]))])
    lines += ["", "word_share: the word's part of the variance that is not sampling noise. word_x_train: what a "
              "training seed carries across JL matrices (the crossed term); train_within_jl: what is particular to "
              "one training given its JL matrix (word_x_train + interaction: the training draw nested in the JL "
              "draw); word_x_run: word_x_jl + train_within_jl, everything particular to a run.", "",
              "## Differences (paired over words)", ""]
    lines += markdown_table(tables["differences"], [
        ("contrast", lambda r: r["contrast"]), ("statistic", lambda r: r["statistic"]),
        ("difference [interval]", lambda r: fmt_ci(r["difference"], r["ci_low"], r["ci_high"], ".4f"))])
    lines += ["", "Within each arm, word x JL minus the training draw (variances; crossed word x training, and the "
              "training draw nested in the JL draw):", ""]
    lines += [f"- {name}: word_x_jl - word_x_train {fmt_ci(res.jl_vs_train['difference'], *res.jl_vs_train['ci'], '.4f')}; "
              f"word_x_jl - train_within_jl "
              f"{fmt_ci(res.jl_vs_train_within['difference'], *res.jl_vs_train_within['ci'], '.4f')}"
              for name, res in results.items()]
    lines += ["", "## What the word's part follows", ""]
    lines += markdown_table(tables["predictors"], [
        ("arm", lambda r: r["arm"]), ("predictor", lambda r: r["predictor"]),
        ("slope", lambda r: fmt_ci(r.get("slope", ""), r.get("slope_ci_low", ""), r.get("slope_ci_high", ""), ".2f")),
        ("R^2", lambda r: fmt_ci(r.get("r2", ""), r.get("r2_ci_low", ""), r.get("r2_ci_high", ""), ".2f")),
        ("fraction of the word component", lambda r: fmt_ci(r.get("fraction", ""), r.get("fraction_ci_low", ""),
                                                             r.get("fraction_ci_high", ""), ".2f"))])
    lines += ["", "fraction: the share of the word component that the predictor explains; not defined where the "
              "word variance is estimated at 0 or below.", "",
              f"## Seen words (mean of the runs' shares, {level} t-interval over runs)", ""]
    lines += markdown_table(tables["seen"], [
        ("arm", lambda r: r["arm"]), ("word", lambda r: r["word"]), ("runs", lambda r: str(r["runs"])),
        ("share [interval]", lambda r: fmt_ci(r["mean_share"], r["ci_low"], r["ci_high"])),
        ("runs' range", lambda r: f"{r['run_min']:.3f}-{r['run_max']:.3f}")])
    lines += ["", "Files: components.csv, differences.csv, predictors.csv, per_run.csv, words.csv, seen.csv, "
              "components.png, word_effects.png.", ""]
    return "\n".join(lines)


def plot(results: dict[str, ArmResult], out: Path) -> None:
    from statistical_auditing.core.stats import pyplot, save_figure_atomically

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for i, (name, result) in enumerate(results.items()):
        comp = result.components
        sds = [comp["sd"][k] for k in COMPONENTS]
        errors = np.array([[sd - comp["intervals"][f"sd_{k}"][0], comp["intervals"][f"sd_{k}"][1] - sd]
                           for sd, k in zip(sds, COMPONENTS)]).T
        ax.bar(np.arange(len(COMPONENTS)) + i * width, sds, width, yerr=np.maximum(errors, 0), label=name, capsize=2)
    # seven names side by side overlap: slanted, anchored at their right end under their bars
    ax.set_xticks(np.arange(len(COMPONENTS)) + width * (len(results) - 1) / 2, COMPONENTS, rotation=30, ha="right")
    ax.set_ylabel("sd of the female share")
    ax.legend()
    save_figure_atomically(fig, out / "components.png")
    plt.close(fig)
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.5), sharey=True, squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        ax.errorbar(result.arm.w2v_gap, result.effects["effect"], yerr=1.96 * result.effects["se"], fmt="o",
                    markersize=3, alpha=0.6)
        fit = result.on_w2v
        xs = np.linspace(result.arm.w2v_gap.min(), result.arm.w2v_gap.max(), 2)
        ax.plot(xs, fit["slope"] * (xs - result.arm.w2v_gap.mean()), color="k")
        ax.set_title(f"{name}: slope {fit['slope']:.2f}, R^2 {fit['r2']:.2f}")
        ax.set_xlabel("word2vec gap cos(w, woman) - cos(w, man)")
    axes[0][0].set_ylabel("word effect (share - arm mean)")
    save_figure_atomically(fig, out / "word_effects.png")
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_constants(constants_of(globals()), argv=argv, choices={"method": ("scoredecomp", "attribute")},
                                description=__doc__.splitlines()[0])
    require(cfg["guidance"] > 0, f"--guidance: expected a scale > 0, got {cfg['guidance']}")
    runs_folder, out = Path(cfg["runs"]), Path(cfg["out"])
    runs = select_arms(load_runs(runs_folder, cfg["method"], cfg["guidance"]), cfg["arms"])
    words, dropped = common_words(runs)
    words = select_words(words, cfg["words"])
    # 4: the 2-fold cross-validation must leave 2 words to fit a line
    require(len(words) >= 4, f"--runs/--words: only {len(words)} unseen words audited in every run are analysed; "
                             "need at least 4")
    order = [arm for arm in ARM_DEBIAS if any(run.arm == arm for run in runs)]
    arms = {name: build_arm(name, [run for run in runs if run.arm == name], words) for name in order}
    results = {name: analyse_arm(arm, cfg) for name, arm in arms.items()}
    tables = {"components": component_rows(results), "differences": arm_differences(results, cfg),
              "predictors": predictor_rows(results), "per_run": [r for res in results.values() for r in res.per_run],
              "words": word_rows(results), "seen": seen_rows(arms, runs, cfg["level"])}
    claim_analysis_folder(out, "whose_bias")
    for name, rows in tables.items():
        if rows:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            atomic_write_text(out / f"{name}.csv", compact_csv_text(rows, columns))
    plot(results, out)
    report = render_report(results, runs, dropped, tables, cfg, out)
    atomic_write_text(out / "report.md", report)
    print(report)
    return {"results": results, "tables": tables, "words": words, "dropped": dropped}


if __name__ == "__main__":
    run_main(main)
