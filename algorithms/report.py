"""Tables and figures from run directories: Table 1, Fig. 4 (learning curves), Fig. 8 (flow NLL curves).

Companion to Akimov et al., "Let Offline RL Flow: Training Conservative Agents in the Latent Space
of Normalizing Flows" (arXiv 2211.11096). Reads what the algorithm files leave in their run
directories (config.yaml, results.json, metrics.jsonl; no wandb needed) and writes into --out:

- report.md: a Table-1-style table, one row per dataset and one column per algorithm, each cell
  the mean +- std over seeds (runs) of a run's score = the mean of its last 10 evaluations
  (`last10_mean_normalized_score`, the paper's protocol), with the number of seeds; a second table
  with the paper's Table 1 numbers for the D4RL datasets present; the list of runs read.
- learning_curves_<dataset>.png (Fig. 4): normalised score against training step, mean +- std band
  over seeds per algorithm.
- flow_nll_<dataset>.png (Fig. 8): flow pre-training NLL against flow step, train (dashed) and
  validation (solid) per algorithm, mean +- std band over seeds; only where metrics.jsonl holds
  `flow/train_nll` / `flow/valid_nll` (e.g. cnf vs cnf_normal_ablation run on the same data).
- summary.json: the numbers behind the tables (per group: per-run scores, mean, std, seeds).

    python algorithms/report.py runs/ [more_runs/ ...] --out report/
    python algorithms/report.py runs/ --out report_fig6/ --split_by latent_clip     # Fig. 6: one column per a

Prints `report: <path of report.md>` as the last line.

Conventions (ours; the paper does not spell them out):
- A run directory is any directory under a root that holds results.json or config.yaml (wandb's
  own folders are skipped). Every run directory counts as one seed of its (dataset, algorithm).
- std is the population standard deviation over seeds (numpy's default, ddof = 0, as CORL's
  reports); one seed gives std 0.
- Runs still in progress (no results.json) are included from metrics.jsonl: their evaluations are
  its `eval/normalized_score` lines, their score is the mean of their last 10 evaluations so far,
  and the table marks such cells with `*` ("includes runs in progress"); --finished_only leaves
  them out. Their dataset is `Path(dataset_path).stem` or `env` from config.yaml (the name the
  algorithm files put in results.json); their algorithm is the longest known algorithm name (the
  `ALGORITHM` constants of algorithms/*.py) that prefixes the directory name (the default run name
  is `<algorithm>-<dataset>-seed<seed>-<time>`), else the algorithm whose TrainConfig fields are
  closest to config.yaml's keys (fewest fields in one but not the other, at most 2, to survive a
  field added to a script after the run started; a tie counts as no match); a run that matches
  neither is skipped with a warning.
- metrics.jsonl is appended to on --resume, so a step may appear twice: the last line wins.
- Learning curves align runs on their evaluation steps; at each step the band uses the seeds that
  reached it (a run in progress stops early).
- Dataset names from D4RL file names (`hopper_medium_replay-v2`, `maze2d-umaze-sparse-v1`) are
  matched to the paper's names (`hopper-medium-replay-v2`, `maze2d-umaze-v1`) for the paper table.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ALGORITHMS_DIR = Path(__file__).resolve().parent

# Table 1 of the paper (normalised scores; CNF is the mean over 3 seeds, its +- std alongside).
PAPER_COLUMNS = ("AWAC", "IQL", "PLAS", "LAPO", "CNF")
PAPER_TABLE1 = {
    "walker2d-medium-v2": ("78.20", "78.80", "71.2", "80.75", "83.60 ± 3.01"),
    "walker2d-medium-replay-v2": ("76.76", "74.49", "2.74", "-", "81.96 ± 1.98"),
    "walker2d-medium-expert-v2": ("112.97", "111.96", "108.13", "-", "112.32 ± 0.21"),
    "hopper-medium-v2": ("62.59", "63.7", "52.93", "51.63", "69.32 ± 1.04"),
    "hopper-medium-replay-v2": ("73.12", "87.72", "3.17", "-", "89.04 ± 10.39"),
    "hopper-medium-expert-v2": ("109.64", "109.05", "106.5", "-", "108.6 ± 5.45"),
    "halfcheetah-medium-v2": ("43.15", "47.4", "43.78", "45.97", "50.55 ± 0.53"),
    "halfcheetah-medium-replay-v2": ("42.00", "43.2", "44.8", "-", "45.84 ± 0.31"),
    "halfcheetah-medium-expert-v2": ("87.40", "78.95", "86.63", "-", "96.23 ± 0.20"),
    "maze2d-umaze-v1": ("-", "37.69", "53.9", "118.9", "62.9 ± 10.36"),
    "maze2d-medium-v1": ("-", "35.45", "66.4", "142.8", "155.89 ± 10.49"),
    "maze2d-large-v1": ("-", "49.64", "107.2", "200.6", "212.8 ± 2.23"),
}


def paper_dataset_name(name: str) -> Optional[str]:
    """The paper's name of a dataset, accepting d4rl's cached file stems; None if not in Table 1."""
    if name in PAPER_TABLE1:
        return name
    match = re.match(r"^(halfcheetah|hopper|walker2d)_([a-z_]+)-v2$", name)
    if match:
        candidate = f"{match[1]}-{match[2].replace('_', '-')}-v2"
        return candidate if candidate in PAPER_TABLE1 else None
    candidate = name.replace("-sparse-v1", "-v1")
    return candidate if candidate in PAPER_TABLE1 else None


# ---- Reading runs -----------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    algorithm: str
    dataset: str
    seed: Optional[int]
    finished: bool
    score: Optional[float]  # mean of the last 10 evaluations (None: no evaluation yet)
    evaluations: List[Tuple[int, float]]  # (step, normalised score)
    flow_nll: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # "train"/"valid" -> (step, nll)
    config: dict = field(default_factory=dict)


def known_algorithms(directory: Path = ALGORITHMS_DIR) -> Dict[str, Optional[frozenset]]:
    """ALGORITHM constant -> the field names of its TrainConfig (None if it has none), read with ast."""
    found = {}
    for path in sorted(directory.glob("*.py")):
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        name, fields = None, None
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "ALGORITHM" and isinstance(node.value, ast.Constant)):
                name = node.value.value
            if isinstance(node, ast.ClassDef) and node.name == "TrainConfig":
                fields = frozenset(item.target.id for item in node.body
                                   if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name))
        if isinstance(name, str):
            found[name] = fields
    return found


def read_metrics(path: Path) -> Dict[str, Dict[int, float]]:
    """metrics.jsonl -> key -> {step: value}; a later line for the same step wins (resumed runs)."""
    series: Dict[str, Dict[int, float]] = defaultdict(dict)
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        step = record.pop("step", None)
        if step is None:
            continue
        for key, value in record.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                series[key][int(step)] = float(value)
    return series


FIELD_TOLERANCE = 2  # config.yaml may differ from its script's TrainConfig by this many fields


def infer_algorithm(run_dir: Path, config: dict, algorithms: Dict[str, Optional[frozenset]]) -> Optional[str]:
    by_prefix = [name for name in algorithms if run_dir.name.startswith(f"{name}-")]
    if by_prefix:
        return max(by_prefix, key=len)
    # else the TrainConfig closest to config.yaml's keys: fewest fields in one and not the other,
    # at most FIELD_TOLERANCE (a field added to a script after the run started), and no tie
    distance = sorted((len(fields ^ set(config)), name) for name, fields in algorithms.items() if fields is not None)
    if distance and distance[0][0] <= FIELD_TOLERANCE and (len(distance) == 1 or distance[1][0] > distance[0][0]):
        return distance[0][1]
    return None


def read_run(run_dir: Path, algorithms: Dict[str, Optional[frozenset]], split_by: Sequence[str] = ()) -> Optional[Run]:
    import yaml

    config = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    metrics = read_metrics(run_dir / "metrics.jsonl")
    flow_nll = {name: sorted(metrics[f"flow/{name}_nll"].items()) for name in ("train", "valid")
                if f"flow/{name}_nll" in metrics}
    results_path = run_dir / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        algorithm, dataset = results["algorithm"], results["dataset"]
        evaluations = [(int(e["step"]), float(e["normalized_score"])) for e in results.get("evaluations", [])]
        score = results.get("last10_mean_normalized_score")
        finished = True
    else:
        algorithm = infer_algorithm(run_dir, config, algorithms)
        if algorithm is None:
            warnings.warn(f"{run_dir}: no results.json and the algorithm cannot be inferred "
                          f"(neither the directory name nor config.yaml's fields name one); skipped")
            return None
        dataset = Path(config["dataset_path"]).stem if config.get("dataset_path") else config.get("env")
        if dataset is None:
            warnings.warn(f"{run_dir}: config.yaml names no env or dataset_path; skipped")
            return None
        evaluations = sorted(metrics.get("eval/normalized_score", {}).items())
        score = float(np.mean([s for _, s in evaluations[-10:]])) if evaluations else None
        finished = False
    for key in split_by:  # e.g. latent_clip: one column per value
        if key in config:
            algorithm = f"{algorithm}[{key}={config[key]}]"
    return Run(path=run_dir, algorithm=algorithm, dataset=dataset, seed=config.get("seed"), finished=finished,
               score=None if score is None else float(score), evaluations=evaluations, flow_nll=flow_nll, config=config)


def find_runs(roots: Sequence[str], finished_only: bool = False, split_by: Sequence[str] = ()) -> List[Run]:
    algorithms = known_algorithms()
    runs = []
    for root in roots:
        if not Path(root).is_dir():
            raise SystemExit(f"error: {root} is not a directory")
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d != "wandb" and not d.startswith("."))
            if "results.json" in files or "config.yaml" in files:
                run = read_run(Path(directory), algorithms, split_by)
                if run is not None and (run.finished or not finished_only):
                    runs.append(run)
    return runs


# ---- Statistics --------------------------------------------------------------------------------------
def group_runs(runs: Sequence[Run]) -> Dict[Tuple[str, str], List[Run]]:
    groups: Dict[Tuple[str, str], List[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.dataset, run.algorithm)].append(run)
    return dict(groups)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population std (ddof = 0) over seeds."""
    return float(np.mean(values)), float(np.std(values))


def aligned_curve(series: Sequence[Sequence[Tuple[int, float]]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per step in the union of the runs' steps: mean, std and count over the runs that have it."""
    by_step: Dict[int, List[float]] = defaultdict(list)
    for points in series:
        for step, value in points:
            by_step[step].append(value)
    steps = np.array(sorted(by_step))
    values = [by_step[s] for s in steps]
    return (steps, np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values]),
            np.array([len(v) for v in values]))


# ---- Writing ---------------------------------------------------------------------------------------------
def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot_bands(ax, curves: Dict[str, Sequence[Sequence[Tuple[int, float]]]], linestyle: str = "-",
               colors: Optional[Dict[str, str]] = None, suffix: str = "") -> None:
    for label, series in curves.items():
        steps, mean, std, _ = aligned_curve(series)
        if len(steps) == 0:
            continue
        kwargs = {"color": colors[label]} if colors else {}
        line, = ax.plot(steps, mean, linestyle, label=f"{label}{suffix} (n={len(series)})", **kwargs)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


def write_figures(groups: Dict[Tuple[str, str], List[Run]], out: Path) -> Dict[str, Dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: Dict[str, Dict[str, str]] = {"learning_curves": {}, "flow_nll": {}}
    datasets = sorted({dataset for dataset, _ in groups})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for dataset in datasets:
        algorithms = sorted(a for d, a in groups if d == dataset)
        colors = {a: palette[i % len(palette)] for i, a in enumerate(algorithms)}
        curves = {a: [r.evaluations for r in groups[(dataset, a)] if r.evaluations] for a in algorithms}
        curves = {a: c for a, c in curves.items() if c}
        if curves:  # Fig. 4
            fig, ax = plt.subplots(figsize=(6, 4))
            plot_bands(ax, curves, colors=colors)
            ax.set(xlabel="training step", ylabel="normalised score", title=f"{dataset}: learning curves (mean ± std)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"learning_curves_{file_safe(dataset)}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            figures["learning_curves"][dataset] = path.name
        nll = {kind: {a: [r.flow_nll[kind] for r in groups[(dataset, a)] if r.flow_nll.get(kind)] for a in algorithms}
               for kind in ("train", "valid")}
        nll = {kind: {a: s for a, s in per.items() if s} for kind, per in nll.items()}
        if nll["train"] or nll["valid"]:  # Fig. 8
            fig, ax = plt.subplots(figsize=(6, 4))
            plot_bands(ax, nll["train"], "--", colors, " train")
            plot_bands(ax, nll["valid"], "-", colors, " valid")
            ax.set(xlabel="flow step", ylabel="negative log-likelihood", title=f"{dataset}: flow NLL (mean ± std)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"flow_nll_{file_safe(dataset)}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            figures["flow_nll"][dataset] = path.name
    return figures


def score_cell(runs: Sequence[Run]) -> str:
    scores = [r.score for r in runs if r.score is not None]
    if not scores:
        return "-"
    mean, std = mean_std(scores)
    running = "*" if any(not r.finished for r in runs if r.score is not None) else ""
    return f"{mean:.2f} ± {std:.2f} ({len(scores)}){running}"


def write_report(runs: Sequence[Run], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    datasets = sorted({d for d, _ in groups})
    algorithms = sorted({a for _, a in groups})
    figures = write_figures(groups, out)

    lines = ["# Results", "",
             "Normalised score: mean ± std (population, ddof = 0) over seeds of each run's mean of its last 10 "
             "evaluations; (n) = seeds; `*` = includes runs in progress (score so far).", ""]
    lines += ["| dataset | " + " | ".join(algorithms) + " |", "|---|" + "---|" * len(algorithms)]
    for dataset in datasets:
        cells = [score_cell(groups.get((dataset, a), [])) for a in algorithms]
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    in_paper = [(d, paper_dataset_name(d)) for d in datasets if paper_dataset_name(d)]
    if in_paper:
        lines += ["", "## Paper, Table 1 (reference)", "",
                  "| dataset | " + " | ".join(PAPER_COLUMNS) + " |", "|---|" + "---|" * len(PAPER_COLUMNS)]
        lines += [f"| {paper} | " + " | ".join(PAPER_TABLE1[paper]) + " |" for _, paper in in_paper]
    for title, kind in (("Learning curves (Fig. 4)", "learning_curves"), ("Flow NLL (Fig. 8)", "flow_nll")):
        if figures[kind]:
            lines += ["", f"## {title}", ""] + [f"![{d}]({name})" for d, name in sorted(figures[kind].items())]
    lines += ["", "## Runs", "", "| run | algorithm | dataset | seed | status | evaluations | last step | score |",
              "|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r.dataset, r.algorithm, str(r.seed), str(r.path))):
        last = run.evaluations[-1][0] if run.evaluations else "-"
        score = f"{run.score:.2f}" if run.score is not None else "-"
        lines.append(f"| {run.path} | {run.algorithm} | {run.dataset} | {run.seed} | "
                     f"{'done' if run.finished else 'running'} | {len(run.evaluations)} | {last} | {score} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")

    summary = {f"{d}|{a}": {"dataset": d, "algorithm": a, "scores": [r.score for r in rs if r.score is not None],
                            "seeds": [r.seed for r in rs], "running": sum(not r.finished for r in rs),
                            **dict(zip(("mean", "std"), mean_std([r.score for r in rs if r.score is not None])
                                       if any(r.score is not None for r in rs) else (None, None)))}
               for (d, a), rs in sorted(groups.items())}
    (out / "summary.json").write_text(json.dumps({"groups": summary, "figures": figures}, indent=1))
    return path


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="+", help="folders holding run directories (searched recursively)")
    parser.add_argument("--out", default="report", help="output folder for report.md, PNGs and summary.json")
    parser.add_argument("--finished_only", action="store_true", help="leave out runs without results.json")
    parser.add_argument("--split_by", nargs="*", default=[],
                        help="config.yaml fields whose value is appended to the algorithm (e.g. latent_clip)")
    args = parser.parse_args(argv)
    runs = find_runs(args.roots, args.finished_only, args.split_by)
    if not runs:
        raise SystemExit(f"error: no run directories (with results.json or config.yaml) under {', '.join(args.roots)}")
    return write_report(runs, Path(args.out))


if __name__ == "__main__":
    print(f"report: {main(sys.argv[1:])}")
