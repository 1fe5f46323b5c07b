"""Re-audit a kept run, or re-draw some words' images, without training: one command.

    python tools/reaudit.py --run results/whose_bias/runs/w2v-jl0 --out ~/reaudit/w2v-jl0
    python tools/reaudit.py --run results/whose_bias/runs/w2v-jl0 --out ~/redraw/w2v-jl0 --words surgeon,nurse

A kept run (statistical_auditing/keep_run.py --weights true) holds its EMA weights in half
precision, its conditioning and its audit. This tool:

1. makes the procedural dataset the audit's control and attribute classifier read, if --data has
   no 32/ folder yet (`synthetic_data.py --source procedural --out DATA`, the experiment's data
   job; about a minute);
2. runs `statistical_auditing/audit.py --run RUN --out OUT --dataset_path DATA/32` with every
   setting the run's own audit recorded (RUN/audit/audit.json "config": the seed, hence the same
   sampling noise, the sampler, the words, the images per word, the guidance scales), except where
   files lie, the device and the thread count (--num_threads);
3. compares the new audit's counts with the committed ones (tools/compare_audits.py) and exits
   with its status.

With --words, only those words are drawn (at the audit's settings and seed; images cached as
uint8 .npy under OUT/samples/ with a grid in OUT/samples_g*.png) beside the training words the audit
always checks, and nothing is compared. A run kept without weights is refused with the command
that retrains it (its records.json). OUT must not be inside the run (audit.py refuses that too).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_audits  # noqa: E402  (a sibling tool, not a package)
from bias_begets_bias.cli import constants_of  # noqa: E402
from statistical_auditing import audit as audit_script  # noqa: E402  (only its flags are read)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "generated" / "portraits"
# Settings that say where files lie or how fast to run, not what the audit measures.
NOT_REPEATED = ("run", "out", "dataset_path", "num_threads", "device")


def audit_flags(run: Path, words: str) -> list[str]:
    """audit.py's flags for the run's recorded audit settings (``--words`` replaces its word list)."""
    record = run / "audit" / "audit.json"
    if not record.is_file():
        raise SystemExit(f"error: --run: {record} does not exist (expected a kept run with its audit)")
    config = json.loads(record.read_text()).get("config")
    if not isinstance(config, dict):
        raise SystemExit(f"error: {record} has no 'config' object (written by an older audit.py?)")
    if words:
        config = config | {"words": words, "max_unseen": 0, "full_guidance_words": 0}
    known = constants_of(vars(audit_script))  # audit.json also records derived values (a word list's sha256)
    flags = []
    for key, value in config.items():
        if key in NOT_REPEATED or key not in known:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        flags += [f"--{key}", text]
    return flags


def require_weights(run: Path) -> None:
    """Refuse a run that keeps no weights, naming the command that retrains it (records.json:
    {"<kind>/<run>": {"script", "args", "starts"}}, written by keep_run)."""
    if (run / "ema.safetensors").is_file() or (run / "checkpoints" / "latest").exists():
        return
    records_path = run / "records.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}
    train = next((job for name, job in records.items() if name.startswith("train/")), None)
    hint = (f"; retrain it with `python {train['script']} {' '.join(map(str, train['args']))}` at commit "
            f"{train['starts'][-1]['commit']} (records.json)") if train else ""
    raise SystemExit(f"error: --run: {run} keeps no weights (no ema.safetensors){hint}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a kept run folder (config.json, ema.safetensors, audit/)")
    parser.add_argument("--out", type=Path, required=True, help="the new audit's folder (outside the run)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="procedural dataset root (made if missing)")
    parser.add_argument("--words", default="", help="comma-separated words to draw instead of the audit's word list")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    run = args.run.expanduser().resolve()
    require_weights(run)
    flags = audit_flags(run, args.words)
    python = sys.executable
    data = args.data.expanduser()
    if not (data / "32").is_dir():
        subprocess.run([python, str(REPO / "diffusion_from_scratch" / "synthetic_data.py"), "--source", "procedural",
                        "--out", str(data)], check=True, cwd=REPO)
    audit = [python, str(REPO / "statistical_auditing" / "audit.py"), "--run", str(run), "--out", str(args.out),
             "--dataset_path", str(data / "32"), "--num_threads", str(args.num_threads)] + flags
    print("[reaudit]", " ".join(audit), flush=True)
    status = subprocess.run(audit, cwd=REPO).returncode
    if status or args.words:
        return status
    return compare_audits.main([str(args.out), str(run / "audit")])


if __name__ == "__main__":
    sys.exit(main())
