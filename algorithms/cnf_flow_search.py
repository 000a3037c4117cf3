"""Flow hyperparameter search (Table 3): random-search phase-1 runs, keep the flow with the best validation NLL.

Companion to Akimov et al., "Let Offline RL Flow: Training Conservative Agents in the Latent Space
of Normalizing Flows" (arXiv 2211.11096). The paper pre-trains each dataset's flow with a random
search over the AdamW learning rate, weight decay and batch size (50 runs for locomotion, 20 for
maze2d), keeps the flow with the best validation log-likelihood, and trains every RL seed on it:

    python algorithms/cnf_flow_search.py --env halfcheetah-medium-v2 --trials 50 --out flows/halfcheetah-medium-v2.pt
    python algorithms/cnf_flow_search.py --config_path algorithms/configs/cnf/hopper-medium-replay-v2.yaml \
        --out flows/hopper-medium-replay-v2.pt        # env and flow sizes from the per-dataset YAML
    python algorithms/cnf.py --config_path algorithms/configs/cnf/hopper-medium-replay-v2.yaml \
        --flow_checkpoint flows/hopper-medium-replay-v2.pt --seed 0
    python algorithms/cnf_flow_search.py --resume runs/flow_search-...   # continue (or extend with --trials N)

Each trial is one call of cnf.py's own `pretrain_flow(config, buffer, run)`, on one
replay buffer built by cnf.py's `load_offline_data`, with a `Run` of cnf.py's for the trial's
directory: a trial is exactly cnf.py's phase 1 with that trial's `flow_lr`, `flow_weight_decay` and
`flow_batch_size`, and it writes what cnf.py's phase 1 writes (metrics.jsonl, checkpoint.pt,
status.json, flow.pt). cnf.py's other flow fields (`--flow_layers`, `--flow_hidden`, `--flow_steps`,
`--flow_grad_clip`, `--flow_valid_fraction`, `--flow_eval_every`, `--amp`) are fixed for the whole
search. `--flow_script cnf_normal_ablation` searches the Normal-latent flow of Figs. 5, 6 and 8
instead (cnf_latent_only.py's phase 1 is cnf.py's).

This file is not self-contained: it imports the algorithm files whose phase 1 it runs (`import cnf`,
...; nothing is copied). Python finds them because it puts a script's own directory, algorithms/,
first on sys.path (`python algorithms/cnf_flow_search.py`); to import this file as a module, put
algorithms/ on sys.path first (tests/conftest.py does).

Writes into RUN_DIR (`--checkpoints_path`/`--run_name`, default runs/flow_search-<dataset>-seed<seed>-<time>):
search.yaml (the resolved settings), trial_NNN/ (the trial's metrics.jsonl with its train and
validation NLL curves, and its flow.pt), trials.json and trials.csv (every finished trial: its
hyperparameters, best validation NLL, steps, wall time; rewritten after each trial), and copies the
winner's flow.pt to `--out` (default RUN_DIR/best_flow.pt), ready for `--flow_checkpoint`. Prints
`results: <path of trials.json>` as the last line.

Choices where the paper and the official sweep (tinkoff-ai/cnf configs/sweep_flow.py, a wandb random
sweep) are silent or where we deviate:
- Learning rate log-uniform in [1e-5, 3e-3] (`--lr_sampling log_uniform`): the range spans 2.5 decades,
  and a uniform draw puts 90% of the trials above 3e-4. The official sweep gives wandb a min and a max,
  which wandb samples uniformly: `--lr_sampling uniform` does the same.
- Weight decay uniform in [0, 1e-2] (as the official sweep; a log-uniform law cannot reach 0); batch
  size uniform over {512, 1024, 2048}.
- Every trial uses the same validation split (cnf.py draws it from `--seed`, the search's seed), so
  the trials' validation NLLs are comparable; each trial's initialisation and batches come from its
  own seed, drawn with its hyperparameters. Trials are drawn in sequence from `--seed`: the same seed
  gives the same trials, and `--trials` only appends to the sequence.
- A trial whose validation NLL is not finite (a diverged run) can never win.
- The paper counts pre-training in steps (100k), the official code in epochs: `--flow_steps` is cnf.py's.
- Disk: only the best flow so far is kept (a 12 x 256 flow.pt is ~4 MB; 50 trials would keep 175 MB);
  `--keep_trial_flows` keeps every trial's. A trial's checkpoint.pt is deleted when the trial ends.
- No wandb (the trials run with `wandb_mode: disabled`): each trial's curves are in its metrics.jsonl.

Reading order: the search space (`SearchConfig`, `draw_trials`), then `search(config)`, the loop over
trials; the command line below it.
"""
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

# The algorithm files whose phase 1 a trial runs (algorithms/ is on sys.path: see the docstring).
import cnf
import cnf_latent_only
import cnf_normal_ablation

FLOW_SCRIPTS = {"cnf": cnf, "cnf_normal_ablation": cnf_normal_ablation, "cnf_latent_only": cnf_latent_only}
LR_SAMPLINGS = ("log_uniform", "uniform")


@dataclass
class SearchConfig:
    # --- data (as cnf.py) ---
    env: str = "halfcheetah-medium-gymv5"  # D4RL name (halfcheetah-medium-v2, ...) or bundled dataset name
    dataset_path: Optional[str] = None  # any D4RL-format HDF5 file; overrides --env
    eval_env: Optional[str] = None  # Gymnasium id (only for a --dataset_path file without an `env` attribute)
    flow_script: str = "cnf"  # whose phase 1: cnf (Uniform latent, also cnf_latent_only's) | cnf_normal_ablation
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # torch device
    cpu_threads: Optional[int] = None  # torch CPU threads (default: torch's, one per core)
    seed: int = 0  # draws the trials; also the validation split, the same for every trial
    # --- the search (Table 3) ---
    trials: Optional[int] = None  # random-search runs (default: the paper's 50 for locomotion, 20 for maze2d)
    lr_min: float = 1e-5  # AdamW learning rate range (paper: [1e-5, 3e-3])
    lr_max: float = 3e-3  # upper end of the learning rate range
    lr_sampling: str = "log_uniform"  # log_uniform | uniform (the official wandb sweep: uniform)
    weight_decay_min: float = 0.0  # AdamW weight decay range, sampled uniformly (paper: [0, 1e-2])
    weight_decay_max: float = 1e-2  # upper end of the weight decay range
    batch_sizes: Tuple[int, ...] = (512, 1024, 2048)  # pre-training batch sizes, one drawn per trial
    out: Optional[str] = None  # where the winning flow.pt is copied (default: RUN_DIR/best_flow.pt)
    keep_trial_flows: bool = False  # keep every trial's flow.pt (default: only the best so far)
    # --- fixed for every trial: cnf.py's phase-1 fields ---
    flow_layers: int = 12  # K blocks (paper: 12 medium, medium-expert; 4 medium-replay, maze2d)
    flow_hidden: int = 256  # coupling conditioner width (paper: 256; 64 medium-replay, maze2d)
    flow_steps: int = 100_000  # pre-training steps per trial
    flow_grad_clip: float = 0.1  # gradient-norm clip
    flow_valid_fraction: float = 0.1  # held-out fraction (the same rows for every trial)
    flow_eval_every: int = 1_000  # steps between validation NLL evaluations; a trial's score is its best
    amp: bool = False  # bfloat16 matmuls in the flow conditioners
    # --- run directory ---
    checkpoints_path: str = "runs"  # the search directory is created here
    run_name: Optional[str] = None  # default: flow_search-<dataset>-seed<seed>-<time>
    resume: Optional[str] = None  # RUN_DIR of a stopped search: continue with its settings (flags may raise --trials)
    config_path: Optional[str] = None  # a cnf.py YAML (configs/cnf/<dataset>.yaml): env, flow sizes; other keys ignored


@dataclass
class Trial:
    """One random-search draw; everything a trial depends on besides the search's fixed settings."""

    index: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int  # of the trial's initialisation and batches


def draw_trials(config: SearchConfig, n: int) -> List[Trial]:
    """The first n trials of the sequence that --seed defines (trial k does not depend on n)."""
    rng = np.random.default_rng(config.seed)
    trials = []
    for index in range(n):
        if config.lr_sampling == "log_uniform":
            lr = math.exp(rng.uniform(math.log(config.lr_min), math.log(config.lr_max)))
        else:
            lr = rng.uniform(config.lr_min, config.lr_max)
        weight_decay = rng.uniform(config.weight_decay_min, config.weight_decay_max)
        batch_size = int(config.batch_sizes[rng.integers(len(config.batch_sizes))])
        trials.append(Trial(index, float(lr), float(weight_decay), batch_size, int(rng.integers(2**31 - 1))))
    return trials


def parse_search_config(argv: List[str]) -> SearchConfig:
    """tyro flags over --resume's search.yaml or --config_path's YAML (its fields of this class only)."""
    import tyro
    import yaml

    names = {f.name for f in fields(SearchConfig)}
    default = SearchConfig()
    for flag in ("--resume", "--config_path"):
        if flag in argv:
            path = Path(argv[argv.index(flag) + 1])
            path = path / "search.yaml" if flag == "--resume" else path
            if not path.is_file():
                what = " (not a search directory)" if flag == "--resume" else ""
                raise SystemExit(f"error: {flag} {path} does not exist{what}")
            values = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k in names}
            if "batch_sizes" in values:
                values["batch_sizes"] = tuple(values["batch_sizes"])
            default = replace(SearchConfig(), **values)
            break  # a resumed search keeps its own settings
    config = tyro.cli(SearchConfig, args=argv, default=default, use_underscores=True)
    if config.flow_script not in FLOW_SCRIPTS:
        raise SystemExit(f"error: --flow_script must be one of {', '.join(FLOW_SCRIPTS)}, not {config.flow_script!r}")
    if config.lr_sampling not in LR_SAMPLINGS:
        raise SystemExit(f"error: --lr_sampling must be log_uniform or uniform, not {config.lr_sampling!r}")
    if not 0 < config.lr_min <= config.lr_max or not 0 <= config.weight_decay_min <= config.weight_decay_max:
        raise SystemExit("error: need 0 < lr_min <= lr_max and 0 <= weight_decay_min <= weight_decay_max")
    if not config.batch_sizes or min(config.batch_sizes) < 1 or (config.trials is not None and config.trials < 1):
        raise SystemExit("error: --batch_sizes needs positive sizes and --trials at least 1")
    return config


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_trials(run_dir: Path, summary: dict) -> Path:
    """trials.json (everything) and trials.csv (one row per trial), both rewritten whole."""
    rows = summary["trials"]
    write_atomic(run_dir / "trials.json", json.dumps(summary, indent=1))
    columns = ["trial", "lr", "weight_decay", "batch_size", "seed", "best_valid_nll", "steps", "wall_time_s"]
    tmp = run_dir / ".trials.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run_dir / "trials.csv")
    return run_dir / "trials.json"


def best_of(rows: List[dict]) -> Optional[dict]:
    finite = [row for row in rows if row["best_valid_nll"] is not None]
    return min(finite, key=lambda row: (row["best_valid_nll"], row["trial"])) if finite else None


def search(config: SearchConfig) -> Path:
    """Run (or continue) the search; copy the winner's flow.pt to --out; return the trials.json path."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; pass --device cpu")
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    script = FLOW_SCRIPTS[config.flow_script]
    base = script.TrainConfig(env=config.env, dataset_path=config.dataset_path, eval_env=config.eval_env,
                              device=config.device, seed=config.seed, flow_layers=config.flow_layers,
                              flow_hidden=config.flow_hidden, flow_steps=config.flow_steps,
                              flow_grad_clip=config.flow_grad_clip, flow_valid_fraction=config.flow_valid_fraction,
                              flow_eval_every=config.flow_eval_every, amp=config.amp, wandb_mode="disabled")
    data = script.load_offline_data(base)
    n_trials = config.trials or (20 if script.D4RL_MAZE2D.match(data.name) else 50)
    if config.resume is not None:
        run_dir = Path(config.resume)
    else:
        name = config.run_name or f"flow_search-{data.name}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(config.checkpoints_path) / name
        run_dir.mkdir(parents=True, exist_ok=True)
    previous = json.loads((run_dir / "trials.json").read_text()) if (run_dir / "trials.json").exists() else {}
    rows = [row for row in previous.get("trials", []) if row["trial"] < n_trials]
    drawn = draw_trials(config, n_trials)
    for row in rows:  # flags given with --resume must not change what the finished trials were
        trial = drawn[row["trial"]]
        if (row["lr"], row["weight_decay"], row["batch_size"], row["seed"]) != \
                (trial.lr, trial.weight_decay, trial.batch_size, trial.seed):
            raise SystemExit(f"error: {run_dir} holds trials of other search settings (--seed, ranges); "
                             f"resume with its own settings or start a new search")
    import yaml

    write_atomic(run_dir / "search.yaml", yaml.safe_dump({**asdict(config), "batch_sizes": list(config.batch_sizes)},
                                                         sort_keys=False))
    out = Path(config.out) if config.out else run_dir / "best_flow.pt"
    buffer = script.ReplayBuffer(data, config.device)

    for trial in drawn[len(rows):]:
        trial_dir = run_dir / f"trial_{trial.index:03d}"
        trial_dir.mkdir(exist_ok=True)
        checkpoint_path = trial_dir / "checkpoint.pt"
        checkpoint = script.torch_load(checkpoint_path) if checkpoint_path.exists() else None
        trial_config = replace(base, flow_lr=trial.lr, flow_weight_decay=trial.weight_decay,
                               flow_batch_size=trial.batch_size)
        logger = script.RunLogger(trial_config, trial_dir, checkpoint)  # metrics.jsonl (wandb disabled)
        started = time.time()
        run = script.Run(trial_config, data, trial_dir, checkpoint, logger, started)
        script.set_seed(trial.seed)
        script.pretrain_flow(trial_config, buffer, run)  # resumes from run.checkpoint; writes trial_dir/flow.pt
        logger.close()
        run.phase = "done"
        run.set_status("finished")
        checkpoint_path.unlink(missing_ok=True)
        nll = float(script.torch_load(trial_dir / "flow.pt")["best_valid_nll"])
        rows.append({"trial": trial.index, "lr": trial.lr, "weight_decay": trial.weight_decay,
                     "batch_size": trial.batch_size, "seed": trial.seed,
                     "best_valid_nll": nll if math.isfinite(nll) else None, "steps": config.flow_steps,
                     "wall_time_s": time.time() - started, "flow": str(trial_dir / "flow.pt")})
        best = best_of(rows)
        if not config.keep_trial_flows:  # only the best flow so far stays on disk
            for row in rows:
                if row is not best and Path(row["flow"]).exists():
                    Path(row["flow"]).unlink()
        print(f"trial {trial.index} ({trial.index + 1}/{n_trials}): lr {trial.lr:.3g} "
              f"weight_decay {trial.weight_decay:.3g} batch {trial.batch_size} -> best valid NLL {nll:.4f}"
              + (f" (best so far: trial {best['trial']})" if best else ""), flush=True)
        write_trials(run_dir, {"dataset": data.name, "flow_script": config.flow_script, "best": best, "trials": rows})

    best = best_of(rows)
    if best is None:
        raise SystemExit(f"error: no trial reached a finite validation NLL; see {run_dir}/trial_*/metrics.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    if Path(best["flow"]).resolve() != out.resolve():
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(best["flow"], tmp)
        os.replace(tmp, out)
    print(f"best: trial {best['trial']} (lr {best['lr']:.3g}, weight_decay {best['weight_decay']:.3g}, "
          f"batch {best['batch_size']}), valid NLL {best['best_valid_nll']:.4f}; flow: {out}")
    return write_trials(run_dir, {"dataset": data.name, "flow_script": config.flow_script, "best": best,
                                  "out": str(out), "trials": rows})


if __name__ == "__main__":
    path = search(parse_search_config(sys.argv[1:]))
    print(f"results: {path}")
