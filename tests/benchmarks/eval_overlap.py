"""What evaluating every 100 updates costs a run, in the training process and in a background worker.

    python tests/benchmarks/eval_overlap.py [--algo cnf] [--train_steps 1000] [--eval_every 100] [--workers 1]

Runs `algorithms/<algo>.py` with its quick preset (`algorithms/configs/<algo>/quick.yaml`, one training thread) on
the bundled default dataset three ways: an evaluation (10 episodes) every `--eval_every` updates in the training
process (`--eval_workers 0`), the same in `--workers` background processes, and no evaluation until the last
update. cnf.py's flow is pre-trained once (`--flow_steps`) and reused by all three (`--flow_checkpoint`), so the
wall times are phase 2's. Prints `eval_overlap <mode> wall_s <seconds>` per mode, then `eval_overlap <mode>
overhead_pct <value>`: wall time over the no-evaluation wall time, minus 1, in percent. The runs' scores are
printed too (the same with 0 and N workers: evaluation is seeded, never timed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(algo: str, flags: list, out: Path, name: str) -> tuple:
    command = [sys.executable, str(ROOT / "algorithms" / f"{algo}.py"), "--config_path",
               str(ROOT / "algorithms" / "configs" / algo / "quick.yaml"), "--cpu_threads", "1", "--device", "cpu",
               "--wandb_mode", "disabled", "--checkpoints_path", str(out), "--run_name", name, *flags]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed:\n{proc.stderr[-2000:]}")
    results = json.loads((out / name / "results.json").read_text())
    return wall, [round(e["normalized_score"], 2) for e in results["evaluations"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="cnf")
    parser.add_argument("--train_steps", type=int, default=1000)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--flow_steps", type=int, default=500, help="cnf.py's phase 1, run once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out, common = Path(tmp), ["--train_steps", str(args.train_steps)]
        if args.algo.startswith("cnf"):
            run(args.algo, ["--flow_steps", str(args.flow_steps), "--train_steps", "1", "--eval_episodes", "1"],
                out, "flow")
            common += ["--flow_checkpoint", str(out / "flow" / "flow.pt")]
        modes = {"in_process": ["--eval_every", str(args.eval_every), "--eval_workers", "0"],
                 f"workers_{args.workers}": ["--eval_every", str(args.eval_every), "--eval_workers", str(args.workers)],
                 "no_evaluation": ["--eval_every", str(args.train_steps), "--eval_workers", "0"]}
        walls = {}
        for mode, flags in modes.items():
            walls[mode], scores = run(args.algo, common + flags, out, mode)
            print(f"eval_overlap {mode} wall_s {walls[mode]:.1f}", flush=True)
            print(f"eval_overlap {mode} scores {scores}", flush=True)
        for mode in list(modes)[:2]:
            print(f"eval_overlap {mode} overhead_pct {100 * (walls[mode] / walls['no_evaluation'] - 1):.1f}")


if __name__ == "__main__":
    main()
