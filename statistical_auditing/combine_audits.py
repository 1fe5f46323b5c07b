"""Combine the audited runs of the experiment into the answer: arms x JL seeds.

    python statistical_auditing/combine_audits.py --runs runs/exp/w2v-jl0,runs/exp/debiased-jl0,... --out runs/exp/combined

Each run must have been audited (statistical_auditing/audit.py writes <run>/audit/); its
dose-response (<run>/dose_response/) and Lipschitz measurement (<run>/lipschitz/) are used
when present. Runs are grouped by arm (the run's debias setting: none = w2v, hard =
debiased before the projection, projected = debiased after it); within an arm the runs
differ by JL seed, a source of variance the answer must average over.

A run that fails its controls (ScoreDecomp accuracy at the chosen k not above chance, or
the fidelity bar at the audit's sampler) is shown with the reason and LEFT OUT of every
pooled estimate.

The design the intervals follow: every run audits the same unseen words and (with the audit's
default, one --seed for all runs) draws each seen word from the same sampling seeds, so words
and seeds are CROSSED with runs, and runs are nested in arms. Every interval over runs is a
crossed (pigeonhole) bootstrap (Owen 2007, Ann. Appl. Stat. 1(2); McCullagh 2000, Bernoulli
6(2)): each resample draws the runs with replacement and ONE draw of words (or seeds) used in
every drawn run; the word draws are the same in every arm and every fit (from --seed), the run
draws independent per arm (different models), so arm contrasts are paired over words.

1. Seen words (balanced training data): each run's female share pooled over its sampling
   seeds (binomial; Wilson interval), the seed-to-seed spread and a chi-square test that
   the seeds agree; per arm the mean over runs with an interval from a crossed resample of
   runs x sampling seeds (each run's seeds.csv counts as observed; the seed draws shared by
   every drawn run) when the runs' audits recorded one seed, and from a nested one (runs,
   then each run's seeds) when their audit seeds differ (experiment.py --audit_noise per_run)
   (experiment_stats.pooled_over_runs_and_seeds).
2. Unseen words: the female share regressed on three measures of a word's embedding bias:
   cos(w, woman) - cos(w, man) in the original word2vec (the same x for every arm),
   in the arm's own space before the projection, and after the projection (what the model
   sees). Per run, and pooled per arm with the crossed bootstrap over runs and words
   (experiment_stats.hierarchical_regression); the runs' rows are aligned by word name, and
   a run lacking a word another run has is refused. A regression whose x has no spread (a
   debiased gap) is reported as undefined. Each arm's slope minus the w2v slope, paired over
   the shared word draws (contrasts.csv), and R^2 differences, paired likewise
   (r2_contrasts.csv: within an arm, R^2 on the after-JL gap minus R^2 on word2vec's gap;
   and each arm's R^2 minus the reference arm's on the same x). Held-out prediction:
   repeated random 2-fold cross-validation of the arm's line (--cv_repeats splits of its
   words, each word's points in every run held out together; experiment_stats.held_out_prediction),
   with the range over splits only. How far apart the words' shares are: their sd and the part
   beyond binomial noise (experiment_stats.between_word_sd), per run and arm; and whose that
   spread is: the word's own part against each run's own (components.csv;
   variance_components.decompose_runs, words x runs, word-redraw intervals).
3. What a random projection does to a word's gap without any training: the distribution of
   (after-JL gap - before-JL gap) over all usable professions, per JL seed and for projection
   sizes --jl_dims, for the original and the hard-debiased embedding.
4. Dose-response slopes and Lipschitz ratios, per run and per arm.

The runs must belong together: each listed once (by folder and by identity: arm, JL seed,
training seed and recipe), and the same training recipe, training step, audit settings (k rule,
sampler, sample steps, images per word, guidance scales) and unseen word list; otherwise one
line names the differing setting and the two runs' values. Inputs read again here (the
professions list) come from this repository, checked against the sha256 the audit recorded or,
for older audits without one, against the words the run's tables hold; the absolute path a
run recorded on its own machine is never opened. --out must be a new or empty folder or an
earlier output of this script (marked by .owner.json), and never inside a run folder.

Outputs in --out: report.md, runs.csv, seen.csv, seen_arms.csv, regressions.csv,
contrasts.csv, r2_contrasts.csv (R^2 differences), held_out.csv, unseen.csv, spread.csv,
components.csv, jl_shifts.csv, jl_shift_summary.csv, dose_slopes.csv, dose_points.csv, lipschitz.csv, and PNGs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from bias_begets_bias.cli import (InputError, config_from_constants, constants_of, parse_number_list, require,
                                    run_main)
from bias_begets_bias.pipeline import training_recipe
from bias_begets_bias.utils import (atomic_write_text, compact_csv_text, load_json, load_word_list,
                                          read_csv_table, read_text_file, require_writable, writable_folder)
from statistical_auditing.from_scratch import experiment_stats as E
from statistical_auditing.from_scratch.sampling import METHOD_NAMES, X_VARIANTS
from statistical_auditing.from_scratch.variance_components import decompose_runs

REPO = Path(__file__).resolve().parent.parent
OWNER_FILE = ".owner.json"  # marks --out as this script's output, so a rerun may replace it
OWNER = {"tool": "combine_audits"}
# combine's own outputs: a folder holding these (an output made before the marker existed) is ours too
OWN_OUTPUTS = ("report.md", "runs.csv")
OWN_TITLE = "# Combined audit of the experiment"

# ----------------------------------------------------------------------------- config
RUNS = ""  # comma-separated run folders (each audited) or their audit folders
OUT = "runs/combined_audit"  # output folder
N_BOOT = 2000  # [10, inf) bootstrap resamples (crossed: runs x words, runs x sampling seeds)
SEED = 0  # [0, 2**63) bootstrap seed
JL_DIMS = "64,128,256"  # list of ints in [1, inf): projection sizes for the projection-only gap shifts
JL_SHIFT_SEEDS = "0,1,2"  # list of ints in [0, 2**32): JL seeds for the projection-only gap shifts
CV_REPEATS = 200  # [1, inf) random 2-fold splits of the held-out prediction
REFERENCE_ARM = "w2v"  # arm the others are contrasted with
INCLUDE_FAILED = False  # pool runs that fail their controls too (a sensitivity analysis, or a smoke check)

ARM_NAMES = {"none": "w2v", "hard": "debiased", "projected": "projected"}
ARM_TEXT = {"w2v": "word2vec as it is", "debiased": "hard-debiased before the JL projection",
            "projected": "hard-debiased after the JL projection"}
FOCUS_SEEN = ("nurse", "philosopher", "person")


def _float(text) -> float:
    try:
        return float(text) if text not in ("", None) else math.nan
    except ValueError:
        return math.nan


def load_run(entry: str) -> dict:
    """One audited run: audit.json, proportions.csv, seeds.csv, and dose / Lipschitz outputs if present."""
    path = Path(entry).expanduser()
    audit_dir = path if (path / "audit.json").is_file() else path / "audit"
    run_dir = audit_dir.parent
    needed = [audit_dir / name for name in ("audit.json", "proportions.csv", "seeds.csv")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise InputError(f"--runs: {entry} has no complete audit (missing {', '.join(missing)} in {audit_dir}); "
                         f"run python statistical_auditing/audit.py --run {run_dir} first")
    summary = load_json(needed[0])
    if not isinstance(summary, dict):
        raise InputError(f"--runs: {needed[0]} is not an audit summary (a JSON object); rerun the audit of {run_dir}")
    for key in ("debias", "jl_seed", "run_step", "k", "config", "controls_failed", "seen", "unseen"):
        require(key in summary, f"--runs: {needed[0]} lacks {key!r}; rerun the audit of {run_dir}")
    require(isinstance(summary["config"], dict) and isinstance(summary["controls_failed"], list),
            f"--runs: {needed[0]}: 'config' must be an object and 'controls_failed' a list; rerun the audit of {run_dir}")
    shares = read_csv_table(needed[1], ("word", "seen", "guidance", "method", "n", "successes"))
    try:
        for row in shares:
            row["guidance"] = _float(row["guidance"])
            row["seen"] = row["seen"] == "True"
            for key in ("share", "ci_low", "ci_high", *X_VARIANTS):
                row[key] = _float(row.get(key))
            row["n"], row["successes"] = int(row["n"] or 0), int(row["successes"] or 0)
    except ValueError as error:
        raise InputError(f"{needed[1]}: expected integer counts in columns n and successes ({error})") from None
    seeds = read_csv_table(needed[2], ("word", "guidance", "method", "n", "successes"))
    try:
        for row in seeds:
            row["guidance"] = _float(row["guidance"])
            row["n"], row["successes"] = int(row["n"] or 0), int(row["successes"] or 0)
    except ValueError as error:
        raise InputError(f"{needed[2]}: expected integer counts in columns n and successes ({error})") from None
    dose = run_dir / "dose_response"
    lipschitz = run_dir / "lipschitz" / "lipschitz.json"
    lipschitz_summary = load_json(lipschitz) if lipschitz.is_file() else None
    require(lipschitz_summary is None or isinstance(lipschitz_summary, dict),
            f"{lipschitz}: expected a JSON object (lipschitz.py writes it); rerun lipschitz.py or move it away")
    config_path = run_dir / "config.json"
    training = load_json(config_path) if config_path.is_file() else {}
    require(isinstance(training, dict), f"{config_path}: expected the run's training record (a JSON object); "
                                        f"is {run_dir} a run folder?")
    arm = ARM_NAMES.get(str(summary["debias"]), str(summary["debias"]))
    return {"name": run_dir.name, "dir": run_dir, "entry": entry, "resolved": run_dir.resolve(), "training": training,
            "summary": summary, "shares": shares, "seeds": seeds, "arm": arm,
            "jl_seed": summary["jl_seed"], "failed": list(summary["controls_failed"]),
            "dose_points": read_csv_table(dose / "dose_response.csv", missing_ok=True),
            "dose_slopes": read_csv_table(dose / "slopes.csv", missing_ok=True),
            "lipschitz": lipschitz_summary}


# ----------------------------------------------------------------------------- do the runs belong together?
def run_identity(run: dict) -> tuple:
    train = run["training"].get("train") if isinstance(run["training"].get("train"), dict) else {}
    return (run["arm"], run["jl_seed"], train.get("seed"), json.dumps(training_recipe(run["training"]), sort_keys=True))


def refuse_duplicates(runs: list[dict]) -> None:
    """Each run once: two entries naming the same folder (A, A/, A/audit, a link to A) or two
    folders holding the same run (a copy: same arm, JL seed, training seed and recipe) stop here."""
    for i, run in enumerate(runs):
        for earlier in runs[:i]:
            if run["resolved"] == earlier["resolved"]:
                raise InputError(f"--runs: {earlier['entry']!r} and {run['entry']!r} are the same run folder "
                                 f"({display_path(run['dir'], None)}); list each run once")
            if run_identity(run) == run_identity(earlier):
                raise InputError(f"--runs: {earlier['entry']!r} and {run['entry']!r} hold the same run (arm "
                                 f"{run['arm']}, JL seed {run['jl_seed']}, training seed "
                                 f"{run_identity(run)[2]}, same recipe): a copy; list each run once")
            if run["name"] == earlier["name"]:
                raise InputError(f"--runs: {earlier['entry']!r} and {run['entry']!r} are both named {run['name']!r}, "
                                 f"the name every table gives a run; rename one folder")


def comparable_settings(run: dict) -> dict:
    """What must agree between pooled runs, by the name a refusal shows: the training step and
    recipe, how the audit measured (the k rule: k requested, 0 = chosen on the run's own
    selection half, so the chosen k may differ; sampler, steps, images, guidance scales,
    methods) and which words it audited (the word list's repository file and the words)."""
    summary, config = run["summary"], run["summary"]["config"]
    settings = {"training step": summary["run_step"]}
    settings |= {f"training recipe: {key}": value for key, value in sorted(training_recipe(run["training"]).items())}
    for key in ("k", "k_list", "num_inference_steps", "sampler", "sample_steps", "n_per_word", "n_per_seed",
                "n_seeds", "max_unseen", "unseen_pick", "call", "scoredecomp_base"):
        settings[f"audit {key}"] = config.get(key)
    settings |= {"guidance scales": summary.get("guidance"), "audit methods": summary.get("methods"),
                 "embedding": summary.get("embedding"), "seen words": summary.get("seen"),
                 "unseen words": summary.get("unseen"), "unseen word list": run["words_file"]}
    return settings


def refuse_mixed_runs(runs: list[dict]) -> None:
    """Runs pooled together must differ only in their identity; the first setting that differs stops here."""
    first, reference = runs[0], comparable_settings(runs[0])
    for run in runs[1:]:
        settings = comparable_settings(run)
        for key in dict.fromkeys([*reference, *settings]):
            if settings.get(key) != reference.get(key):
                raise InputError(f"--runs: {first['name']} and {run['name']} do not belong together: {key} differs "
                                 f"({_show(reference.get(key))} vs {_show(settings.get(key))})")


def _show(value) -> str:
    return "not recorded" if value is None else json.dumps(value, sort_keys=True) if not isinstance(value, str) \
        else value


def sha256_of(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None


def repository_file(recorded: str, what: str) -> Path:
    """The repository's copy of an input a run recorded: a relative path is relative to the
    repository root; an absolute one (the machine that made the run, e.g.
    /root/bbb/code-d806bef/data/professions.txt) is matched by its longest tail that exists
    here (data/professions.txt). The recorded absolute path itself is never opened."""
    parts = Path(recorded).parts
    if not Path(recorded).is_absolute():
        candidates = [REPO / recorded]
    else:
        candidates = [REPO.joinpath(*parts[i:]) for i in range(1, len(parts))]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise InputError(f"{what}: {recorded} has no counterpart in the repository {display_path(REPO, None)!r}; "
                         f"the combine reads its inputs from the repository")
    return found


def words_file_of(run: dict) -> str:
    """The run's unseen word list as a repository path, checked against what the audit used: the
    sha256 it recorded, or (older audits record none) every audited and every missing word must
    be in the list. Returns "" when the audit named no list (--words)."""
    config, summary = run["summary"]["config"], run["summary"]
    recorded = config.get("words_file") or ""
    if not recorded:
        return ""
    where = f"{display_path(run['dir'], None)}/audit/audit.json"
    path = repository_file(str(recorded), f"{where}: words_file")
    relative = path.relative_to(REPO).as_posix()
    expected = config.get("words_file_sha256")
    if expected:
        actual = sha256_of(path)
        require(actual == expected, f"{relative}: sha256 {actual} differs from the {expected} the audit of "
                                    f"{run['name']} recorded; the run was audited with another word list")
        return relative
    listed = {w.lower() for w in load_word_list(path)}
    respelled = {str(v).lower(): str(k).lower() for k, v in (summary.get("respelled") or {}).items()}
    audited = [r["word"] for r in run["shares"] if not r["seen"]]
    used = [*audited, *(summary.get("unseen") or []), *(summary.get("missing") or [])]
    absent = sorted({w for w in used if w.lower() not in listed and respelled.get(w.lower()) not in listed})
    require(not absent, f"{relative}: lacks {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}, which the "
                        f"audit of {run['name']} used; the run was audited with another word list")
    return relative


def display_path(path: Path, out: Path | None) -> str:
    """``path`` relative to the repository root, else (outside it) relative to --out: never the
    machine's absolute path in what the combine writes."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(REPO).as_posix() or "."
    except ValueError:
        base = Path(os.path.abspath(out)) if out is not None else Path.cwd()
        return Path(os.path.relpath(path, base)).as_posix()


def refuse_foreign_out(out: Path, runs: list[dict]) -> None:
    """--out must not be inside (or be) a run folder, nor a non-empty folder that another tool or
    person owns: it must be new, empty, marked by OWNER_FILE, or hold combine's own outputs."""
    target = Path(os.path.abspath(out)).resolve()
    for run in runs:
        if target == run["resolved"] or run["resolved"] in target.parents:
            raise InputError(f"--out: {out} is inside the run folder {run['entry']}; the combine never writes "
                             f"into a run, choose a folder outside it")
    if not target.is_dir() or not any(target.iterdir()):
        return
    marker = target / OWNER_FILE
    if marker.is_file():
        owner = load_json(marker)
        require(isinstance(owner, dict) and owner.get("tool") == OWNER["tool"],
                f"--out: {out} belongs to {owner.get('tool') if isinstance(owner, dict) else 'another tool'!r} "
                f"({OWNER_FILE}); choose an empty or new folder")
        return
    own = all((target / name).is_file() for name in OWN_OUTPUTS) and \
        read_text_file(target / "report.md", "a combined report").startswith(OWN_TITLE)
    require(own, f"--out: {out} is a non-empty folder that is not an earlier combine output (no {OWNER_FILE}, "
                 f"no {' + '.join(OWN_OUTPUTS)}); choose an empty or new folder")


def fmt(value: float, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def fmt_ci(pair: Sequence[float], spec: str = ".2f") -> str:
    return f"[{fmt(pair[0], spec)}, {fmt(pair[1], spec)}]"


# ----------------------------------------------------------------------------- the combinations
def arm_seed(seed: int, arm: str) -> list[int]:
    """The seed of an arm's run draws, [--seed, CRC-32 of the arm's name]: each arm draws its runs
    independently (they are different models), while every fit shares the word draws of --seed."""
    return [int(seed), zlib.crc32(arm.encode())]


def sampling_seeds_shared(members: list[dict]) -> tuple[bool, str]:
    """Whether the runs' seen-word samples share their sampling seeds: every audit draws seed k of a
    word from its --seed (audit.json config "seed"), so equal recorded seeds mean seed k is the same
    noise in every run (crossed); different ones (experiment.py --audit_noise per_run) mean not."""
    seeds = [run["summary"]["config"].get("seed") for run in members]
    if len({json.dumps(s) for s in seeds}) == 1:
        return True, ("every run's audit seed is " + (str(seeds[0]) if seeds[0] is not None
                                                      else "unrecorded (taken as the same)"))
    return False, "the runs' audit seeds differ (" + ", ".join(map(str, dict.fromkeys(seeds))) + ")"


def run_label(row: dict) -> str:
    """A run's short name in a per-run list: its name without the arm ("jl0", "jl0-s1"), so that two
    trainings with one JL matrix stay apart."""
    name, arm = str(row["run"]), str(row["arm"])
    return name[len(arm) + 1:] if name.startswith(f"{arm}-") and len(name) > len(arm) + 1 else name


def seen_tables(runs: list[dict], included: list[dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    """Per run (pooled over its seeds) and per arm (over its included runs, resampling runs x
    sampling seeds) shares of the seen words."""
    per_run = []
    for run in runs:
        keys = dict.fromkeys((r["word"], r["guidance"], r["method"]) for r in run["seeds"])
        for word, guidance, method in keys:
            counts = [(r["successes"], r["n"]) for r in run["seeds"]
                      if (r["word"], r["guidance"], r["method"]) == (word, guidance, method)]
            pooled = E.pooled_share(counts)
            per_run.append({"run": run["name"], "arm": run["arm"], "jl_seed": run["jl_seed"], "word": word,
                            "guidance": guidance, "method": method, "included": run in included, **pooled})
    per_arm = []
    for arm in dict.fromkeys(r["arm"] for r in included):
        members = [run for run in included if run["arm"] == arm]
        shared, why = sampling_seeds_shared(members)
        rows = [r for r in per_run if r["arm"] == arm and r["included"]]
        for key in dict.fromkeys((r["word"], r["guidance"], r["method"]) for r in rows):
            chosen = [r for r in rows if (r["word"], r["guidance"], r["method"]) == key]
            tables = {run["name"]: {r["seed_index"]: r for r in run["seeds"]
                                    if (r["word"], r["guidance"], r["method"]) == key} for run in members}
            tables = {name: table for name, table in tables.items() if table}
            if shared:  # seed k must be seed k in every run
                try:
                    cells = E.align_rows(tables, "sampling seed")[1]
                except InputError as error:
                    raise InputError(f"seen word {key[0]!r} at guidance {key[1]:g}, {key[2]} ({why}): "
                                     f"{error}") from None
            else:
                cells = [list(table.values()) for table in tables.values()]
            pooled = E.pooled_over_runs_and_seeds([[c["successes"] for c in run] for run in cells],
                                                  [[c["n"] for c in run] for run in cells], shared,
                                                  cfg["n_boot"], arm_seed(cfg["seed"], arm))
            per_arm.append({"arm": arm, "word": key[0], "guidance": key[1], "method": key[2],
                            "n_images": sum(r["n"] for r in chosen), **pooled, "seed_design": why,
                            "per_run": "; ".join(f"{run_label(r)}: {fmt(r['share'])}" for r in chosen)})
    return per_run, per_arm


def unseen_rows(run: dict, guidance: float, method: str) -> dict[str, dict]:
    """A run's usable unseen-word rows at one scale and method (n > 0), by word."""
    return {r["word"]: r for r in run["shares"]
            if not r["seen"] and r["guidance"] == guidance and r["method"] == method and r["n"] > 0}


def aligned_unseen(included: list[dict]) -> tuple[dict, dict]:
    """(guidance, method) -> (words, {run name: its unseen rows in the order of words}), aligned
    over every included run of every arm at once, so that word index j is one word in every run
    and arm (what the crossed, paired resamples index). A run lacking a word is refused: the
    design is broken. A word that some run audited but could not call at this scale and method
    (n = 0: e.g. the attribute rule undetermined on every image) is a measurement, not a broken
    design: it leaves this (guidance, method) in every run, and the second dict lists it."""
    combos = dict.fromkeys((r["guidance"], r["method"]) for run in included for r in run["shares"] if not r["seen"])
    aligned, uncalled = {}, {}
    for guidance, method in combos:
        audited = {run["name"]: {r["word"]: r for r in run["shares"]
                                 if not r["seen"] and r["guidance"] == guidance and r["method"] == method}
                   for run in included}
        dropped = sorted({word for rows in audited.values() for word, r in rows.items() if r["n"] <= 0})
        try:
            words, rows = E.align_rows({name: {w: r for w, r in rows.items() if w not in dropped}
                                        for name, rows in audited.items()}, "unseen word")
        except InputError as error:
            raise InputError(f"unseen words at guidance {guidance:g}, {method}: {error}") from None
        aligned[(guidance, method)] = (words, dict(zip((run["name"] for run in included), rows)))
        if dropped:
            uncalled[(guidance, method)] = dropped
    return aligned, uncalled


def xy_groups(named_rows: dict[str, list[dict]], x_key: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per run the (x, y) arrays of its aligned rows; None when no run recorded this x (an older
    audit). A word whose x one run lacks would break the alignment: refused."""
    groups = [(np.array([r[x_key] for r in rows], dtype=np.float64), np.array([r["share"] for r in rows]))
              for rows in named_rows.values()]
    if all(np.isnan(x).all() for x, _ in groups):
        return None
    for (name, rows), (x, _) in zip(named_rows.items(), groups):
        missing = [r["word"] for r, value in zip(rows, x) if not math.isfinite(value)]
        require(not missing, f"{name}: no {x_key} for {', '.join(missing[:3])}, which the other words (and runs) "
                             f"have; rerun its audit")
    return groups


def fit_of(named_rows: dict[str, list[dict]], x_key: str, cfg: dict, seed, words) -> dict:
    """experiment_stats.hierarchical_regression of the runs' aligned rows on x_key, resampled with
    ``words`` (the shared word draws) where their length fits."""
    groups = xy_groups(named_rows, x_key) if any(named_rows.values()) else []
    if groups is None:
        return E.undefined_fit(f"no run recorded {x_key}", len(named_rows), 0)
    n_words = len(next(iter(named_rows.values()), []))
    return E.hierarchical_regression(groups, cfg["n_boot"], seed,
                                     words=words if words is not None and words.shape[1] == n_words else None)


def regressions(runs: list[dict], included: list[dict], aligned: dict, cfg: dict) -> tuple[list[dict], dict]:
    """Per-run and per-arm fits of female share on each x variant; returns rows and the arm fits.
    Every fit of one scale and method resamples the same word draws (from --seed); each arm draws
    its runs with its own seed, the same for all its x variants."""
    rows, arm_fits = [], {}
    combos = dict.fromkeys((r["guidance"], r["method"]) for run in runs for r in run["shares"] if not r["seen"])
    for guidance, method in combos:
        words, by_run = aligned.get((guidance, method), ([], {}))
        draws = E.word_draws(len(words), cfg["n_boot"], cfg["seed"]) if words else None
        for x_key in X_VARIANTS:
            for run in runs:
                own = by_run.get(run["name"]) or list(unseen_rows(run, guidance, method).values())
                fit = fit_of({run["name"]: own}, x_key, cfg, cfg["seed"], draws)
                rows.append(fit_row("run", run["name"], run["arm"], guidance, method, x_key, fit, run in included))
            for arm in dict.fromkeys(r["arm"] for r in included):
                members = {run["name"]: by_run[run["name"]] for run in included if run["arm"] == arm}
                fit = fit_of(members, x_key, cfg, arm_seed(cfg["seed"], arm), draws)
                arm_fits[(arm, guidance, method, x_key)] = fit
                rows.append(fit_row("arm", arm, arm, guidance, method, x_key, fit, True))
    return rows, arm_fits


def fit_row(level: str, name: str, arm: str, guidance: float, method: str, x_key: str, fit: dict,
            included: bool) -> dict:
    return {"level": level, "name": name, "arm": arm, "guidance": guidance, "method": method, "x": x_key,
            "included": included, "defined": fit["defined"], "reason": fit.get("reason", ""),
            "n_runs": fit["n_runs"], "n_points": fit["n_points"], "slope": fit["slope"],
            "slope_ci_low": fit["slope_ci"][0], "slope_ci_high": fit["slope_ci"][1], "intercept": fit["intercept"],
            "r2": fit["r2"], "r2_ci_low": fit["r2_ci"][0], "r2_ci_high": fit["r2_ci"][1]}


def contrasts(arm_fits: dict, reference: str) -> list[dict]:
    """Each arm's slope minus the reference arm's on the same x, paired over the shared word draws."""
    rows = []
    for (arm, guidance, method, x_key), fit in arm_fits.items():
        if arm == reference or (reference, guidance, method, x_key) not in arm_fits:
            continue
        c = E.slope_contrast(fit, arm_fits[(reference, guidance, method, x_key)])
        rows.append({"arm": arm, "reference": reference, "guidance": guidance, "method": method, "x": x_key,
                     "defined": c["defined"], "difference": c["difference"], "ci_low": c["ci"][0],
                     "ci_high": c["ci"][1]})
    return rows


R2_WITHIN_ARM = ("cosine_gap_jl", "cosine_gap_w2v")  # R^2 on the after-JL gap minus R^2 on word2vec's gap


def r2_contrasts(arm_fits: dict, reference: str) -> list[dict]:
    """R^2 differences, paired over the shared word draws: within each arm, R^2 on the after-JL
    gap minus R^2 on word2vec's gap (the same run draws too: one arm, one seed), and each arm's
    R^2 minus the reference arm's on the same x (runs drawn independently)."""
    rows = []
    for (arm, guidance, method, x_key), fit in arm_fits.items():
        pairs = []
        if x_key == R2_WITHIN_ARM[0] and (arm, guidance, method, R2_WITHIN_ARM[1]) in arm_fits:
            pairs.append((arm, R2_WITHIN_ARM[1]))
        if arm != reference and (reference, guidance, method, x_key) in arm_fits:
            pairs.append((reference, x_key))
        for ref_arm, ref_x in pairs:
            other = arm_fits[(ref_arm, guidance, method, ref_x)]
            c = E.paired_contrast(fit, other, "r2")
            rows.append({"arm": arm, "x": x_key, "reference_arm": ref_arm, "reference_x": ref_x,
                         "guidance": guidance, "method": method, "defined": c["defined"], "r2": fit["r2"],
                         "reference_r2": other["r2"], "difference": c["difference"], "ci_low": c["ci"][0],
                         "ci_high": c["ci"][1]})
    return rows


def unseen_tables(runs: list[dict], included: list[dict], aligned: dict, cfg: dict) -> tuple[list[dict], list[dict]]:
    """Every run's unseen-word shares (one row per run, word, scale, method), and per run and arm
    how far apart the words' shares are: sd and the spread beyond sampling noise (tau), with
    crossed resamples of runs and the shared word draws."""
    per_word = [{"run": run["name"], "arm": run["arm"], "jl_seed": run["jl_seed"], "included": run in included,
                 **{key: r[key] for key in ("word", "guidance", "method", "n", "successes", "share", "ci_low",
                                            "ci_high", *X_VARIANTS)}}
                for run in runs for r in run["shares"] if not r["seen"] and r["n"] > 0]
    spread = []

    def counts(rows: list[dict]) -> tuple[list[int], list[int]]:
        return [r["successes"] for r in rows], [r["n"] for r in rows]

    for guidance, method in dict.fromkeys((r["guidance"], r["method"]) for r in per_word):
        words, by_run = aligned.get((guidance, method), ([], {}))
        draws = E.word_draws(len(words), cfg["n_boot"], cfg["seed"]) if len(words) >= 2 else None
        for run in runs:
            own = by_run.get(run["name"]) or list(unseen_rows(run, guidance, method).values())
            one = E.pooled_between_word_sd([counts(own)], cfg["n_boot"], cfg["seed"],
                                           words=draws if draws is not None and len(own) == len(words) else None)
            spread.append(spread_row("run", run["name"], run["arm"], guidance, method, one, run in included))
        for arm in dict.fromkeys(r["arm"] for r in included):
            members = [counts(by_run[run["name"]]) for run in included if run["arm"] == arm]
            pooled = E.pooled_between_word_sd(members, cfg["n_boot"], arm_seed(cfg["seed"], arm), words=draws)
            spread.append(spread_row("arm", arm, arm, guidance, method, pooled, True))
    return per_word, spread


def spread_row(level: str, name: str, arm: str, guidance: float, method: str, result: dict, included: bool) -> dict:
    return {"level": level, "name": name, "arm": arm, "guidance": guidance, "method": method, "included": included,
            "n_runs": result["n_runs"], "sd": result["sd"], "sd_ci_low": result["sd_ci"][0],
            "sd_ci_high": result["sd_ci"][1], "tau": result["tau"], "tau_ci_low": result["tau_ci"][0],
            "tau_ci_high": result["tau_ci"][1], "noise_sd": result["noise_sd"], "min": result["min"],
            "max": result["max"]}


def components(included: list[dict], aligned: dict, cfg: dict) -> list[dict]:
    """Per arm, guidance and method: the word's own part of the unseen shares against each run's
    own (variance_components.decompose_runs: words x runs, run means removed, binomial noise split
    off; intervals from the shared word draws of --seed). With one training seed per JL seed, word
    x run holds word x JL draw, word x training draw and their interaction together."""
    rows = []
    for (guidance, method), (words, by_run) in aligned.items():
        for arm in dict.fromkeys(r["arm"] for r in included):
            members = [by_run[run["name"]] for run in included if run["arm"] == arm]
            if len(members) < 2 or len(words) < 3:
                continue
            shares = np.array([[r["successes"] / r["n"] for r in rows_] for rows_ in members]).T
            sizes = np.array([[r["n"] for r in rows_] for rows_ in members], dtype=np.float64).T
            result = decompose_runs(shares, sizes, n_boot=cfg["n_boot"], seed=cfg["seed"])
            sd, ci = result["sd"], result["intervals"]
            rows.append({"arm": arm, "guidance": guidance, "method": method, "n_words": result["n_words"],
                         "n_runs": result["n_runs"], "word_sd": sd["word"], "word_sd_low": ci["sd_word"][0],
                         "word_sd_high": ci["sd_word"][1], "word_x_run_sd": sd["word_x_run"],
                         "word_x_run_sd_low": ci["sd_word_x_run"][0], "word_x_run_sd_high": ci["sd_word_x_run"][1],
                         "sampling_sd": sd["sampling"], "word_share": result["word_share"],
                         "word_share_low": ci["word_share"][0], "word_share_high": ci["word_share"][1],
                         "r_min": min(result["correlations"]), "r_max": max(result["correlations"])})
    return rows


def held_out(included: list[dict], aligned: dict, cfg: dict) -> list[dict]:
    """Per arm, guidance, method and x: the arm's line on its run x word points, held out by
    repeated random 2-fold cross-validation over words (experiment_stats.held_out_prediction,
    --cv_repeats splits drawn from --seed; the range is over the splits only)."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in included):
        for (guidance, method), (_, by_run) in aligned.items():
            members = {run["name"]: by_run[run["name"]] for run in included if run["arm"] == arm}
            for x_key in X_VARIANTS:
                groups = xy_groups(members, x_key) or [(np.empty(0), np.empty(0))]
                x, y = np.concatenate([g[0] for g in groups]), np.concatenate([g[1] for g in groups])
                words = np.concatenate([np.arange(g[0].size) for g in groups])  # rows are aligned by word
                result = E.held_out_prediction(x, y, folds=2, repeats=cfg["cv_repeats"], seed=cfg["seed"],
                                               groups=words)
                rows.append({"arm": arm, "guidance": guidance, "method": method, "x": x_key,
                             "defined": result["defined"], "n": result["n"], "folds": result["folds"],
                             "repeats": result["repeats"], "r2_out": result["r2_out"],
                             "r2_out_low": result["r2_out_ci"][0], "r2_out_high": result["r2_out_ci"][1],
                             "rmse": result["rmse"], "rmse_low": result["rmse_ci"][0],
                             "rmse_high": result["rmse_ci"][1], "mae": result["mae"]})
    return rows


def jl_shift_rows(words: Sequence[str], source: str, seeds: Sequence[int], dims: Sequence[int]) -> list[dict]:
    """One row per embedding (w2v, hard-debiased), JL seed, size and word: the gap before and after
    the run's projection (jl_matrix) and the shift (experiment_stats.jl_gap_shifts). The vectors
    before the projection are the float32 ones training projects; the rest is float64 with fixed-
    order sums, so the table is the same whatever OMP_NUM_THREADS or MKL_NUM_THREADS say."""
    from bias_begets_bias.word_vectors import (FEMALE_WORD, MALE_WORD, debiased_vectors, jl_matrix,
                                                     load_word_vectors)

    wv = load_word_vectors(source)
    table = list(words) + [FEMALE_WORD, MALE_WORD]
    rows = []
    for mode in ("none", "hard"):
        before = debiased_vectors(wv, table) if mode == "hard" else wv.units(table)
        for dim in dims:
            for seed in seeds:
                shifts = E.jl_gap_shifts(before[:-2], before[-2], before[-1], jl_matrix(wv.dim, dim, seed))
                rows += [{"word": w, "jl_seed": int(seed), "jl_dim": int(dim), "gap_before": float(b),
                          "gap_after": float(a), "shift": float(s), "embedding": ARM_NAMES[mode]}
                         for w, b, a, s in zip(words, shifts["gap_before"], shifts["gap_after"], shifts["shift"])]
    return rows


def jl_shifts(runs: list[dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    """Projection-only gap shifts over all usable professions (no training involved), from the
    runs' word list as this repository holds it (checked against each run in words_file_of)."""
    from bias_begets_bias.word_vectors import load_word_vectors, vocabulary_form

    words_file = runs[0]["words_file"]
    if not words_file:  # the audits named no word list (--words): nothing to measure
        return [], []
    source = runs[0]["summary"]["embedding"]
    wv = load_word_vectors(source)
    seen = set(runs[0]["summary"]["seen"])
    words = [w for w in dict.fromkeys(vocabulary_form(w, wv) for w in load_word_list(REPO / words_file))
             if w and w not in seen]
    dims = parse_number_list(cfg["jl_dims"], "jl_dims", int)
    seeds = parse_number_list(cfg["jl_shift_seeds"], "jl_shift_seeds", int)
    if not words:
        return [], []
    rows = jl_shift_rows(words, source, seeds, dims)
    summary = []
    for (embedding, dim, seed) in dict.fromkeys((r["embedding"], r["jl_dim"], r["jl_seed"]) for r in rows):
        shifts = np.array([r["shift"] for r in rows if (r["embedding"], r["jl_dim"], r["jl_seed"]) == (embedding, dim,
                                                                                                        seed)])
        summary.append({"embedding": embedding, "jl_dim": dim, "jl_seed": seed, "n_words": shifts.size,
                        "mean": float(shifts.mean()), "sd": float(shifts.std(ddof=1)),
                        "abs_p95": float(np.percentile(np.abs(shifts), 95)), "min": float(shifts.min()),
                        "max": float(shifts.max()), "one_over_sqrt_dim": 1 / math.sqrt(dim)})
    return rows, summary


def dose_tables(included: list[dict]) -> tuple[list[dict], list[dict]]:
    slopes, points = [], []
    for run in included:
        for row in run["dose_slopes"]:
            slopes.append({"run": run["name"], "arm": run["arm"], "jl_seed": run["jl_seed"], **row})
        for row in run["dose_points"]:
            points.append({"run": run["name"], "arm": run["arm"], "jl_seed": run["jl_seed"], **row})
    return slopes, points


def lipschitz_table(included: list[dict]) -> list[dict]:
    rows = []
    for run in included:
        if not run["lipschitz"]:
            continue
        for entry in run["lipschitz"]["per_timestep"]:
            rows.append({"run": run["name"], "arm": run["arm"], "jl_seed": run["jl_seed"], **entry,
                         "output_lipschitz": run["lipschitz"]["output_lipschitz"]})
    return rows


# ----------------------------------------------------------------------------- plots
def plot_regressions(included: list[dict], arm_fits: dict, guidance: float, method: str, path: Path) -> None:
    from statistical_auditing.core.stats import pyplot, save_figure_atomically

    plt = pyplot()
    arms = list(dict.fromkeys(r["arm"] for r in included))
    fig, axes = plt.subplots(1, len(X_VARIANTS), figsize=(5.5 * len(X_VARIANTS), 4.5), squeeze=False)
    try:
        for ax, (x_key, x_text) in zip(axes[0], X_VARIANTS.items()):
            for i, arm in enumerate(arms):
                xs, ys = [], []
                for run in (r for r in included if r["arm"] == arm):
                    pts = [r for r in run["shares"] if not r["seen"] and r["guidance"] == guidance
                           and r["method"] == method and r["n"] > 0 and not math.isnan(r[x_key])]
                    xs += [r[x_key] for r in pts]
                    ys += [r["share"] for r in pts]
                fit = arm_fits.get((arm, guidance, method, x_key))
                label = arm
                if fit and fit["defined"]:
                    label += f": slope {fit['slope']:.2f} {fmt_ci(fit['slope_ci'])}, R2 {fit['r2']:.2f}"
                    grid = np.linspace(min(xs), max(xs), 50)
                    ax.plot(grid, fit["intercept"] + fit["slope"] * grid, color=f"C{i}")
                elif fit:
                    label += ": slope undefined (x has no spread)"
                ax.scatter(xs, ys, s=10, alpha=0.6, color=f"C{i}", label=label)
            ax.set_xlabel(x_text.pooled)
            ax.set_ylabel(f"female share ({METHOD_NAMES.get(method, method)})")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
        fig.suptitle(f"Unseen words, guidance {guidance:g}: every run's words, pooled line per arm")
        save_figure_atomically(fig, path)
    finally:
        plt.close(fig)


def plot_jl_shifts(shift_rows: list[dict], included: list[dict], guidance: float, method: str, path: Path) -> None:
    from statistical_auditing.core.stats import pyplot, save_figure_atomically

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        dims = sorted({r["jl_dim"] for r in shift_rows})
        data = [[r["shift"] for r in shift_rows if r["embedding"] == "debiased" and r["jl_dim"] == d] for d in dims]
        axes[0].violinplot(data, showmedians=True)
        axes[0].set_xticks(range(1, len(dims) + 1), [f"{d} dims" for d in dims])
        for i, d in enumerate(dims):
            axes[0].plot([i + 0.75, i + 1.25], [1 / math.sqrt(d)] * 2, "k--", linewidth=1)
            axes[0].plot([i + 0.75, i + 1.25], [-1 / math.sqrt(d)] * 2, "k--", linewidth=1)
        axes[0].set_ylabel("after-JL gap - before-JL gap")
        axes[0].set_title("Hard-debiased professions: the gap a random projection adds\n(dashed: +-1/sqrt(dim); "
                          "no training involved)")
        for i, run in enumerate(r for r in included if r["arm"] == "debiased"):
            pts = [r for r in run["shares"] if not r["seen"] and r["guidance"] == guidance and r["method"] == method
                   and r["n"] > 0]
            axes[1].scatter([r["cosine_gap_jl"] for r in pts], [r["share"] for r in pts], s=12, color=f"C{i}",
                            label=f"{run['name']}")
        axes[1].set_xlabel("after-JL gap of the hard-debiased word (= the projection's shift)")
        axes[1].set_ylabel(f"female share ({METHOD_NAMES.get(method, method)}, guidance {guidance:g})")
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].set_title("...and what the trained models draw for those words")
        axes[1].legend(fontsize=7)
        save_figure_atomically(fig, path)
    finally:
        plt.close(fig)


def plot_dose(points: list[dict], path: Path) -> None:
    from statistical_auditing.core.stats import pyplot, save_figure_atomically

    plt = pyplot()
    methods = list(dict.fromkeys(p["method"] for p in points))
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.5), squeeze=False)
    try:
        for ax, method in zip(axes[0], methods):
            words = list(dict.fromkeys(p["word"] for p in points))
            for i, word in enumerate(words):
                for space, style in (("embedding", "o-"), ("projected", "s--")):
                    sel = [p for p in points if p["word"] == word and p["method"] == method and p["space"] == space]
                    alphas = sorted({float(p["alpha"]) for p in sel})
                    if not alphas:
                        continue
                    mean, low, high = [], [], []
                    for alpha in alphas:
                        counts = [(int(p["successes"]), int(p["n"])) for p in sel if float(p["alpha"]) == alpha]
                        pooled = E.pooled_over_runs(counts, 500, 0)
                        mean.append(pooled["share"])
                        low.append(pooled["ci_low"])
                        high.append(pooled["ci_high"])
                    mean, low, high = map(np.array, (mean, low, high))
                    ax.errorbar(np.array(alphas) + (0.006 if space == "projected" else 0), mean,
                                yerr=np.vstack([mean - low, high - mean]), fmt=style, color=f"C{i}", capsize=2,
                                markersize=3, label=word + ("" if space == "embedding" else " (moved after JL)"))
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("alpha: gender direction added to the word (before the projection)")
            ax.set_ylabel("female share, mean over runs (95% CI over runs and images)")
            ax.set_title(METHOD_NAMES.get(method, method))
            ax.legend(fontsize=7)
        save_figure_atomically(fig, path)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class Combined:
    """What report.md is rendered from: the combine's settings, its runs and its tables."""

    cfg: dict
    runs: list[dict]  # load_run's records, in --runs order
    included: list[dict]  # the runs the pooled estimates use
    arms: list[str]  # every run's arm, in first-seen order
    seen_arms: list[dict]  # seen_arms.csv
    fit_rows: list[dict]  # regressions.csv
    contrast_rows: list[dict]  # contrasts.csv
    r2_rows: list[dict]  # r2_contrasts.csv
    held_rows: list[dict]  # held_out.csv
    spread_rows: list[dict]  # spread.csv
    component_rows: list[dict]  # components.csv
    shift_summary: list[dict]  # jl_shift_summary.csv
    dose_slopes: list[dict]  # dose_slopes.csv
    lipschitz_rows: list[dict]  # lipschitz.csv
    guidances: list[float]  # every guidance scale the runs' shares hold, ascending
    methods: list[str]  # every audit method, in first-seen order
    plots: dict  # ("regression", guidance, method), "jl" or "dose" -> the PNG's file name
    uncalled: dict  # (guidance, method) -> unseen words some run could not call there (left out of that cell)
    min_homogeneity_p: float  # the smallest seed-agreement p (NaN: no multi-seed rows)
    n_homogeneity: int  # the seed-agreement tests behind it


def runs_section(c: Combined) -> list[str]:
    """The title, what was pooled and how, and each run with its controls."""
    lines = ["# Combined audit of the experiment", "",
             f"{len(c.runs)} runs in {len(c.arms)} arms ({', '.join(f'{a}: {ARM_TEXT.get(a, a)}' for a in c.arms)}); "
             f"{len(c.included)} enter the pooled estimates"
             + (" (**--include_failed: runs that fail their controls are pooled too: a sensitivity analysis or a "
                "pipeline check; the primary estimates leave them out**)" if c.cfg["include_failed"]
                else " (those that pass their controls)")
             + f". {method_line(c)}", "",
             "## Runs and their controls", "",
             "| run | arm | JL seed | step | k | ScoreDecomp accuracy at k [95% CI] (AUC) | controls | pooled |",
             "|---|---|---|---|---|---|---|---|"]
    for run in c.runs:
        s = run["summary"]
        acc = s.get("accuracy_at_k") or {}
        accuracy = (f"{fmt(acc.get('accuracy'), '.3f')} {fmt_ci((acc.get('ci_low', math.nan), acc.get('ci_high', math.nan)), '.3f')}"
                    f" ({fmt(acc.get('auc', math.nan), '.3f')})") if acc else "-"
        controls = "passed" if not run["failed"] else "FAILED: " + "; ".join(run["failed"])
        lines.append(f"| {run['name']} | {run['arm']} | {run['jl_seed']} | {s['run_step']} | {s['k']} | {accuracy} | "
                     f"{controls} | {'yes' if run in c.included else '**no**'} |")
    return lines


def method_line(c: Combined) -> str:
    """How the intervals were resampled: the crossed word draws, and per arm the seen words' design."""
    designs: dict[tuple, list[str]] = {}
    for r in c.seen_arms:
        arms = designs.setdefault((r["resample"], r["seed_design"]), [])
        arms += [] if r["arm"] in arms else [r["arm"]]
    seen = "; ".join(f"{E.RESAMPLE_TEXT[kind]} in {', '.join(arms)} ({why})"
                     for (kind, why), arms in designs.items()) or "none pooled"
    return (f"Bootstrap: {c.cfg['n_boot']} crossed (pigeonhole) resamples, seed {c.cfg['seed']}: the unseen words "
            f"are crossed with the runs (every run audits the same words), so each resample draws the runs with "
            f"replacement and ONE draw of words used in every drawn run; the word draws are the same in every arm "
            f"(arm contrasts are paired over words), the run draws independent per arm. Seen words: {seen}.")


def per_scale_tables(c: Combined, header: str, table) -> list[str]:
    """One table per guidance scale and audit method: a heading, ``header`` and its rule, then the
    lines ``table(guidance, method)`` gives, and a blank line."""
    rule = "|" + "---|" * (header.count("|") - 1)
    lines = []
    for guidance in c.guidances:
        for method in c.methods:
            lines += [f"### {METHOD_NAMES.get(method, method)}, guidance {guidance:g}", "", header, rule,
                      *table(guidance, method), ""]
    return lines


def seen_section(c: Combined) -> list[str]:
    """1. The seen words: per guidance and method, each arm's mean over runs; seed agreement."""
    lines = ["", "## 1. Seen words (trained on gender-balanced images)", "",
             "Female share pooled over each run's sampling seeds (Wilson 95% CI), the spread between seeds (sd, "
             "and the chi-square p that the seeds agree), and per arm the mean over runs with an interval "
             "resampling runs x sampling seeds (crossed when the runs share their sampling seeds: see the method "
             "line above; with few seeds, n_seeds in seen_arms.csv, the seed part is coarse).", ""]
    def table(guidance: float, method: str) -> list[str]:
        return [f"| {r['arm']} | {r['word']} | {fmt(r['share'])} {fmt_ci((r['ci_low'], r['ci_high']))} | "
                f"{r['per_run']} | {r['n_runs']} |" for r in c.seen_arms
                if r["guidance"] == guidance and r["method"] == method]

    lines += per_scale_tables(c, "| arm | word | mean over runs [95% CI] | per run | runs |", table)
    lines += ["Per run (pooled over seeds): seen.csv. Seed agreement: "
              + (f"the smallest chi-square p over all runs, words, scales and methods is "
                 f"{fmt(c.min_homogeneity_p, '.3g')} over {c.n_homogeneity} tests." if c.n_homogeneity
                 else "no multi-seed rows."), ""]
    return lines


def unseen_section(c: Combined) -> list[str]:
    """2. The unseen words: per guidance and method, each arm's pooled slope on each x (and its plot)."""
    lines = ["## 2. Unseen words: does the embedding's bias reach the images?", "",
             "Slope of the female share on the word's cosine gap cos(w, woman) - cos(w, man), pooled per arm over "
             "its runs (95% intervals over runs and words); undefined where the gap has no spread.", ""]
    def table(guidance: float, method: str) -> list[str]:
        rows = []
        for r in c.fit_rows:
            if r["level"] == "arm" and r["guidance"] == guidance and r["method"] == method:
                slope = (f"{fmt(r['slope'])} {fmt_ci((r['slope_ci_low'], r['slope_ci_high']))}" if r["defined"]
                         else f"undefined: {r['reason']}")
                r2 = f"{fmt(r['r2'])} {fmt_ci((r['r2_ci_low'], r['r2_ci_high']))}" if r["defined"] else "-"
                rows.append(f"| {r['arm']} | {X_VARIANTS[r['x']].pooled} | {slope} | {r2} | {r['n_points']} |")
        plot = c.plots.get(("regression", guidance, method))
        dropped = c.uncalled.get((guidance, method), [])
        return rows + ([f"\nLeft out here (some run called none of their images): {', '.join(dropped)}."]
                       if dropped else []) + (["", f"![regression g{guidance:g} {method}]({plot})"] if plot else [])

    return lines + per_scale_tables(c, "| arm | x | slope [95% CI] | R^2 [95% CI] | runs x words |", table)


def contrast_section(c: Combined) -> list[str]:
    """Each arm's slope minus the reference arm's, and the R^2 differences, paired over words."""
    lines = [f"### Each arm's slope minus the {c.cfg['reference_arm']} slope", "",
             "Paired over the words: replicate b of both arms resamples the same words (their runs apart).", "",
             "| arm | guidance | method | x | difference [95% CI] |", "|---|---|---|---|---|"]
    for r in c.contrast_rows:
        diff = f"{fmt(r['difference'])} {fmt_ci((r['ci_low'], r['ci_high']))}" if r["defined"] else "undefined"
        lines.append(f"| {r['arm']} | {r['guidance']:g} | {METHOD_NAMES.get(r['method'], r['method'])} | "
                     f"{X_VARIANTS[r['x']].pooled} | {diff} |")
    lines += ["", "### R^2 differences (r2_contrasts.csv)", "",
              "Within an arm, R^2 on the gap after JL minus R^2 on word2vec's gap (the same run and word draws for "
              "both), and each arm's R^2 minus the reference arm's on the same gap (paired over words).", "",
              "| arm, x | minus | guidance | method | R^2 | minus R^2 | difference [95% CI] |",
              "|---|---|---|---|---|---|---|"]
    for r in c.r2_rows:
        diff = f"{fmt(r['difference'])} {fmt_ci((r['ci_low'], r['ci_high']))}" if r["defined"] else "undefined"
        lines.append(f"| {r['arm']}, {X_VARIANTS[r['x']].pooled} | {r['reference_arm']}, "
                     f"{X_VARIANTS[r['reference_x']].pooled} | {r['guidance']:g} | "
                     f"{METHOD_NAMES.get(r['method'], r['method'])} | {fmt(r['r2'])} | {fmt(r['reference_r2'])} | "
                     f"{diff} |")
    return lines


def spread_section(c: Combined) -> list[str]:
    """How far apart the unseen words' shares are, per arm: sd, tau beyond binomial noise, range."""
    lines = ["", "### How far apart are the unseen words' shares?", "",
             "Standard deviation of the female share across the unseen words (mean over the arm's runs), the "
             "part of it beyond binomial sampling noise (tau = sqrt(var - mean p(1-p)/(n-1)); 0 = the words differ "
             "by noise alone), the noise's own sd, and the lowest and highest share; 95% intervals from a "
             "crossed bootstrap over runs and words.", "",
             "| arm | guidance | method | sd of shares [95% CI] | tau, beyond noise [95% CI] | noise sd | "
             "lowest - highest share |", "|---|---|---|---|---|---|---|"]
    for r in c.spread_rows:
        if r["level"] == "arm":
            lines.append(f"| {r['arm']} | {r['guidance']:g} | {METHOD_NAMES.get(r['method'], r['method'])} | "
                         f"{fmt(r['sd'])} {fmt_ci((r['sd_ci_low'], r['sd_ci_high']))} | "
                         f"{fmt(r['tau'])} {fmt_ci((r['tau_ci_low'], r['tau_ci_high']))} | {fmt(r['noise_sd'])} | "
                         f"{fmt(r['min'])} - {fmt(r['max'])} |")
    return lines


def components_section(c: Combined) -> list[str]:
    """Whose is the spread: the word's own part against each run's own (components.csv)."""
    lines = ["", "### Whose is the spread: the word's or the run's?", "",
             "The unseen shares of an arm split into the word's own effect (the same in every run), word x run "
             "(what is particular to one run: its JL draw, its training draw and their interaction, which one "
             "training seed per JL seed cannot tell apart) and binomial sampling noise, as sd "
             "(variance_components.decompose_runs; run means removed; 95% intervals from redrawing the words, "
             "the same words in every run). The word share is the word's part of the variance that is not "
             "sampling noise; r: the correlation of the words' shares between two runs of the arm.", "",
             "| arm | guidance | method | word sd [95% CI] | word x run sd [95% CI] | sampling sd | word share [95% CI] "
             "| r between runs |", "|---|---|---|---|---|---|---|---|"]
    for r in c.component_rows:
        lines.append(f"| {r['arm']} | {r['guidance']:g} | {METHOD_NAMES.get(r['method'], r['method'])} | "
                     f"{fmt(r['word_sd'], '.3f')} {fmt_ci((r['word_sd_low'], r['word_sd_high']), '.3f')} | "
                     f"{fmt(r['word_x_run_sd'], '.3f')} "
                     f"{fmt_ci((r['word_x_run_sd_low'], r['word_x_run_sd_high']), '.3f')} | "
                     f"{fmt(r['sampling_sd'], '.3f')} | {fmt(r['word_share'])} "
                     f"{fmt_ci((r['word_share_low'], r['word_share_high']))} | "
                     f"{fmt(r['r_min'])} to {fmt(r['r_max'])} |")
    return lines


def held_out_section(c: Combined) -> list[str]:
    """The held-out prediction: repeated random 2-fold cross-validation of the arm's line."""
    lines = ["", "### Held-out prediction (fit on a random half of the words, predict the other half)", "",
             f"Mean over {c.cfg['cv_repeats']} random 2-fold splits of the arm's words (a word's points in every "
             "run held out together); the ranges in brackets are over the splits only (how much the answer depends on the split), not confidence "
             "intervals over words, runs or JL draws (variance_components.repeated_cv_r2).", "",
             "| arm | guidance | method | x | RMSE [range] | MAE | R^2 out of sample [range] |",
             "|---|---|---|---|---|---|---|"]
    for h in c.held_rows:
        lines.append(f"| {h['arm']} | {h['guidance']:g} | {METHOD_NAMES.get(h['method'], h['method'])} | "
                     f"{X_VARIANTS[h['x']].pooled} | {fmt(h['rmse'], '.3f')} "
                     f"{fmt_ci((h['rmse_low'], h['rmse_high']), '.3f')} | {fmt(h['mae'], '.3f')} | "
                     f"{fmt(h['r2_out'], '.2f')} {fmt_ci((h['r2_out_low'], h['r2_out_high']))} |")
    return lines


def projection_section(c: Combined) -> list[str]:
    """3. What the JL projection alone does to a word's gap (and its plot)."""
    lines = ["", "## 3. What the projection alone does to a word's gap (no training)", "",
             "after-JL gap - before-JL gap over all usable professions:", "",
             "| embedding | dims | JL seed | words | mean | sd | 95th pct of abs | min | max | 1/sqrt(dims) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in c.shift_summary:
        lines.append(f"| {r['embedding']} | {r['jl_dim']} | {r['jl_seed']} | {r['n_words']} | {r['mean']:+.3f} | "
                     f"{r['sd']:.3f} | {r['abs_p95']:.3f} | {r['min']:+.3f} | {r['max']:+.3f} | "
                     f"{r['one_over_sqrt_dim']:.3f} |")
    if c.plots.get("jl"):
        lines += ["", f"![projection shifts]({c.plots['jl']})"]
    return lines


def dose_lipschitz_section(c: Combined) -> list[str]:
    """4. The dose-response slopes (and plot) and the Lipschitz ratios, per run."""
    lines = ["", "## 4. Dose-response and the Lipschitz view", ""]
    if c.dose_slopes:
        lines += ["Logistic slope of the female call on alpha (log-odds per unit of the gender direction), per run:", "",
                  "| run | word | space | method | slope [95% CI] |", "|---|---|---|---|---|"]
        for s in c.dose_slopes:
            lines.append(f"| {s['run']} | {s['word']} | {s['space']} | {s['method']} | {fmt(_float(s['slope']))} "
                         f"{fmt_ci((_float(s.get('slope_ci_low')), _float(s.get('slope_ci_high'))))} |")
        if c.plots.get("dose"):
            lines += ["", f"![dose-response]({c.plots['dose']})"]
    else:
        lines.append("No dose-response in these runs.")
    lines.append("")
    if c.lipschitz_rows:
        lines += ["Empirical Lipschitz ratios of the learned predictor in its conditioning (RMS change per unit of "
                  "||y1 - y2||), median and maximum over pairs and images, per run, for the noise eps, the score "
                  "-eps / sqrt(1 - abar) and the clean-image prediction x0; output-level L = the largest "
                  "|female share gap| / ||y1 - y2|| over the run's word pairs:", "",
                  "| run | t | eps median / max | score median / max | x0 median / max | output-level L |",
                  "|---|---|---|---|---|---|"]
        for r in c.lipschitz_rows:
            lines.append(f"| {r['run']} | {r['t']} | {r['median']:.3f} / {r['max']:.3f} | {r['score_median']:.3f} / "
                         f"{r['score_max']:.3f} | {r['x0_median']:.3f} / {r['x0_max']:.3f} | "
                         f"{fmt(r['output_lipschitz'], '.3f')} |")
    return lines


FILES_LINES = ["", "Files: runs.csv, seen.csv, seen_arms.csv, regressions.csv, contrasts.csv, r2_contrasts.csv, "
               "held_out.csv, unseen.csv, "
               "spread.csv, components.csv, "
               "jl_shifts.csv, jl_shift_summary.csv, dose_slopes.csv, dose_points.csv, lipschitz.csv, PNGs.", ""]


def report_text(combined: Combined) -> str:
    """report.md, section by section."""
    sections = (runs_section, seen_section, unseen_section, contrast_section, spread_section, components_section,
                held_out_section,
                projection_section, dose_lipschitz_section)
    return "\n".join([line for section in sections for line in section(combined)] + FILES_LINES)


def write_report(out: Path, combined: Combined) -> None:
    """<out>/report.md, rendered from the combined result."""
    atomic_write_text(out / "report.md", report_text(combined))


def draw_plots(out: Path, included: list[dict], arm_fits: dict, shift_rows: list[dict], dose_points: list[dict],
               guidances: list[float], methods: list[str]) -> dict:
    """The PNGs the report shows: ("regression", guidance, method), "jl" or "dose" -> file name in --out."""
    plots = {}
    for guidance in guidances:
        for method in methods:
            if included:
                name = f"regression_g{guidance:g}_{method}.png"
                plot_regressions(included, arm_fits, guidance, method, out / name)
                plots[("regression", guidance, method)] = name
    if any(r["arm"] == "debiased" for r in included) and guidances:
        plot_jl_shifts(shift_rows, included, 1.0 if 1.0 in guidances else guidances[0], "scoredecomp", out / "jl_shifts.png")
        plots["jl"] = "jl_shifts.png"
    if dose_points:
        plot_dose(dose_points, out / "dose_response.png")
        plots["dose"] = "dose_response.png"
    return plots


def checked_runs(cfg: dict) -> list[dict]:
    """The --runs, loaded, once they are distinct runs that belong together and --out lies outside them."""
    entries = [e.strip() for e in cfg["runs"].split(",") if e.strip()]
    require(bool(entries), "--runs: give the audited run folders, comma-separated")
    require(len(set(entries)) == len(entries), f"--runs: a run is listed twice in {cfg['runs']!r}")
    require_writable(Path(cfg["out"]), "out")
    runs = [load_run(e) for e in entries]
    refuse_duplicates(runs)
    for run in runs:
        run["words_file"] = words_file_of(run)
    refuse_mixed_runs(runs)
    refuse_foreign_out(Path(cfg["out"]), runs)
    return runs


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_constants(constants_of(globals()), argv=argv, description=__doc__.splitlines()[0])
    runs = checked_runs(cfg)
    included = [run for run in runs if not run["failed"] or cfg["include_failed"]]
    pooled_arms = list(dict.fromkeys(r["arm"] for r in included))
    # a one-arm combine (experiment.py --arms debiased) has nothing to contrast: only the default may be absent there
    require(cfg["reference_arm"] in pooled_arms or (cfg["reference_arm"] == REFERENCE_ARM and len(pooled_arms) < 2),
            f"--reference_arm: {cfg['reference_arm']!r} is not an arm of the pooled runs (arms: "
            f"{', '.join(pooled_arms)})" if pooled_arms else
            "--runs: no run passes its controls, so nothing is pooled (--include_failed true pools them anyway, "
            "as a sensitivity analysis)")
    out = writable_folder(Path(cfg["out"]), "out")
    atomic_write_text(out / OWNER_FILE, json.dumps(OWNER) + "\n")
    seen_runs, seen_arms = seen_tables(runs, included, cfg)
    aligned, uncalled = aligned_unseen(included)
    fit_rows, arm_fits = regressions(runs, included, aligned, cfg)
    contrast_rows = contrasts(arm_fits, cfg["reference_arm"])
    r2_rows = r2_contrasts(arm_fits, cfg["reference_arm"])
    held_rows = held_out(included, aligned, cfg)
    per_word_rows, spread_rows = unseen_tables(runs, included, aligned, cfg)
    component_rows = components(included, aligned, cfg)
    shift_rows, shift_summary = jl_shifts(runs, cfg)
    dose_slopes, dose_points = dose_tables(included)
    lipschitz_rows = lipschitz_table(included)
    guidances = sorted({r["guidance"] for run in runs for r in run["shares"]})
    methods = list(dict.fromkeys(r["method"] for run in runs for r in run["shares"]))
    plots = draw_plots(out, included, arm_fits, shift_rows, dose_points, guidances, methods)
    homogeneity = [r["homogeneity_p"] for r in seen_runs if r["n_seeds"] > 1 and not math.isnan(r["homogeneity_p"])]
    run_rows = [{"run": r["name"], "arm": r["arm"], "jl_seed": r["jl_seed"], "step": r["summary"]["run_step"],
                 "k": r["summary"]["k"], "included": r in included, "controls_failed": "; ".join(r["failed"]),
                 "path": display_path(r["dir"], out)} for r in runs]
    atomic_write_text(out / "runs.csv", compact_csv_text(run_rows, list(run_rows[0])))
    for name, rows in (("seen.csv", seen_runs), ("seen_arms.csv", seen_arms), ("regressions.csv", fit_rows),
                       ("contrasts.csv", contrast_rows), ("r2_contrasts.csv", r2_rows), ("held_out.csv", held_rows),
                       ("unseen.csv", per_word_rows),
                       ("spread.csv", spread_rows), ("components.csv", component_rows), ("jl_shifts.csv", shift_rows),
                       ("jl_shift_summary.csv", shift_summary), ("dose_slopes.csv", dose_slopes),
                       ("dose_points.csv", dose_points), ("lipschitz.csv", lipschitz_rows)):
        atomic_write_text(out / name, compact_csv_text(rows, list(rows[0]) if rows else ["empty"]))
    combined = Combined(cfg=cfg, runs=runs, included=included, arms=list(dict.fromkeys(r["arm"] for r in runs)),
                        seen_arms=seen_arms, fit_rows=fit_rows, contrast_rows=contrast_rows, r2_rows=r2_rows,
                        held_rows=held_rows,
                        spread_rows=spread_rows, component_rows=component_rows, shift_summary=shift_summary, dose_slopes=dose_slopes,
                        lipschitz_rows=lipschitz_rows, guidances=guidances, methods=methods, plots=plots,
                        min_homogeneity_p=min(homogeneity) if homogeneity else math.nan,
                        n_homogeneity=len(homogeneity), uncalled=uncalled)
    write_report(out, combined)
    print(f"[combine] {len(runs)} runs ({len(included)} pass their controls); wrote "
          f"{display_path(out / 'report.md', Path.cwd())}")
    return {"runs": runs, "included": included, "seen_arms": seen_arms, "fits": fit_rows, "contrasts": contrast_rows,
            "r2_contrasts": r2_rows, "held_out": held_rows, "shift_summary": shift_summary, "out": str(out)}


if __name__ == "__main__":
    run_main(main)
