"""Zero-shot classification with a conditional diffusion model's own likelihood (Li et al. 2023),
the original's script: the method itself is ``statistical_auditing.core.elbo.elbo_classify``.

    python statistical_auditing/diffusion_classifier.py --model RUN_OR_SD --data DATA [flags]
"""
from __future__ import annotations

from bias_begets_bias.cli import InputError
from bias_begets_bias.utils import progress_bar
from statistical_auditing.core.elbo import ELBO_LOSSES, check_prune_schedule, elbo_classify
# the data, condition and model flags are those of fairface.py (see its docstring)
from statistical_auditing.sd_audits.data_flags import (ATTRIBUTE, CLASSES, DATA, DATA_CHOICES, DATA_CONFIG,  # noqa: F401
                                                       IMAGE_COLUMN, IMAGES_ROOT, KIND, LABEL_COLUMN, RESIZE, SELECTION,
                                                       SIZE, SKIP_BAD, SPLIT, TEMPLATE)
from statistical_auditing.sd_audits.model_flags import DEVICE, DTYPE, MODEL, MODEL_CHOICES, SCHEDULER  # noqa: F401

NUM_IMAGES = 250  # [1, inf) images classified
CANDIDATES = ""  # candidate conditions, candidate i <-> class i ("" = family default for --attribute, or --template)
N_SAMPLES = 100  # [1, inf) Monte-Carlo timesteps per image (Li et al. / the original: 100)
LOSS = "l2"  # prediction error: l2 | l1 | huber
PRUNE = ""  # adaptive evaluation "n1:keep1,n2:keep2" (after n1 timesteps keep the keep1 best candidates, ...)
SEED = 0  # [0, 2**63) seed of the shared noise draws and of --selection random
BATCH_SIZE = 8  # [1, inf) images per UNet call (times the number of candidates)
OUT = "runs/diffusion_classifier"  # output folder: summary.csv, predictions.csv, confusion.csv, config.json


def parse_prune(text: str) -> list[tuple[int, int]]:
    """"20:5,50:1" -> [(20, 5), (50, 1)] (checked against n_samples by ``elbo_classify``)."""
    if not text.strip():
        return []
    stages = []
    for part in text.split(","):
        try:
            n_i, keep_i = (int(v) for v in part.split(":"))
        except ValueError:
            raise InputError(f"--prune: expected n:keep pairs such as 20:5,50:1, got {text!r}") from None
        stages.append((n_i, keep_i))
    return stages


def main(argv: list[str] | None = None) -> dict:
    """Classify labelled images with ``elbo_classify``; print and write accuracy (95% Wilson CI;
    an exact tie counts as wrong) and UNet evaluations per image."""
    import time
    from pathlib import Path

    from bias_begets_bias.cli import config_from_constants, constants_of, require
    from bias_begets_bias.utils import (atomic_write_json, atomic_write_text, csv_text, require_writable,
                                              writable_folder)
    from statistical_auditing.sd_audits import cli_common as cc
    from statistical_auditing.core.stats import binary_auc

    cfg = config_from_constants(constants_of(globals()), None, argv,
                                choices={**DATA_CHOICES, **MODEL_CHOICES, "loss": ELBO_LOSSES},
                                description="Zero-shot diffusion ELBO classifier on labelled images (Li et al. 2023).")
    prune = parse_prune(cfg["prune"])
    require_writable(Path(cfg["out"]), "out")
    score_model = cc.load_model(cfg)
    images = cc.open_data(cfg, score_model)
    classes = cc.resolve_classes(cfg, images)
    _, candidates = cc.resolve_conditions(cfg, score_model, classes, need_base=False)
    try:  # a bad schedule fails before any image
        check_prune_schedule(prune, cfg["n_samples"], len(candidates))
    except InputError as error:
        raise InputError(f"--prune {cfg['prune']!r}: {error}") from None
    selected = cc.select_records(images, cc.selected_indices(len(images), cfg["num_images"], cfg["selection"],
                                                             cfg["seed"]), classes)
    out = writable_folder(Path(cfg["out"]), "out")
    atomic_write_json(out / "config.json", cfg | {"candidates": candidates, "classes": classes})

    predictions, seconds, evals = [], 0.0, 0
    matrix = [[0] * (len(classes) + 1) for _ in classes]  # the last column counts ties (no call)
    progress = progress_bar(total=len(selected), desc="ELBO classifier", unit="image")
    for chunk, pixels, consumed in cc.decoded_batches(images, selected, cfg["batch_size"]):
        if chunk:
            x0 = score_model.encode(pixels)
            began = time.perf_counter()
            result = elbo_classify(score_model, x0, candidates, n_samples=cfg["n_samples"], loss=cfg["loss"],
                                   seed=cfg["seed"], prune_schedule=prune)
            seconds += time.perf_counter() - began
            for i, (_, image_id, _, label) in enumerate(chunk):
                pred = int(result["pred"][i])
                matrix[classes.index(label)][pred] += 1
                evals += int(result["n_evals"][i])
                predictions.append({"image_id": image_id, "label": label, "predicted": classes[pred] if pred >= 0
                                    else "tie", "n_evals": int(result["n_evals"][i]),
                                    **{f"p_{c}": round(float(p), 6) for c, p in zip(classes, result["probs"][i])}})
        progress.update(consumed)
    progress.close()
    require(bool(predictions), f"--data {cfg['data']}: every selected image was unreadable")
    n = len(predictions)
    auc = None
    if len(classes) == 2:  # threshold-free: how well p(class 1) - p(class 0) separates the classes
        auc = binary_auc([p[f"p_{classes[1]}"] - p[f"p_{classes[0]}"] for p in predictions],
                         [p["label"] == classes[1] for p in predictions])
    row = cc.accuracy_row("elbo", "", "", cfg["n_samples"], sum(matrix[i][i] for i in range(len(classes))), n,
                          seconds, evals, auc=auc, ties=sum(r[-1] for r in matrix))
    atomic_write_text(out / "summary.csv", csv_text([row], cc.SUMMARY_COLUMNS))
    atomic_write_text(out / "predictions.csv", csv_text(
        predictions, ["image_id", "label", "predicted", "n_evals"] + [f"p_{c}" for c in classes]))
    atomic_write_text(out / "confusion.csv", cc.confusion_text(matrix, classes))
    print(f"ELBO classifier ({cfg['n_samples']} timesteps, {cfg['loss']}"
          + (f", prune {cfg['prune']}" if prune else "") + f"): accuracy {row['accuracy']:.3f} "
          f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (95% Wilson, n={n})"
          + ("" if auc is None else f", AUC {auc:.3f}") + f", {row['evals_per_image']:g} UNet "
          f"evaluations and {row['seconds_per_image']:.4f} s per image; results in {out}")
    return {"row": row, "confusion": matrix, "classes": classes, "predictions": predictions,
            "candidates": candidates}


if __name__ == "__main__":
    from bias_begets_bias.cli import run_main

    run_main(main)
