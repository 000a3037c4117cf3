"""Tables and figures from run directories: Table 1, Fig. 4 (learning curves), Fig. 8 (flow NLL curves).

Companion to Akimov et al., "Let Offline RL Flow: Training Conservative Agents in the Latent Space
of Normalizing Flows" (arXiv 2211.11096). Reads what the algorithm files leave in their run
directories (config.yaml, results.json, metrics.jsonl; no wandb needed) and writes into --out:

- report.md: a Table-1-style table, one row per dataset and one column per algorithm, each cell
  the mean +- std over seeds of a run's score = the mean of its last 10 evaluations
  (`last10_mean_normalized_score`, the paper's protocol), with the number of distinct seeds; beside
  each algorithm its number in the paper's Table 1 for the D4RL datasets, and the dataset's own
  average score (`dataset_normalized_score`, when the runs record it); under the table, the runs
  left out of it and why, and the unreadable run directories; the paper's whole Table 1 for the
  D4RL datasets present; the list of runs read, with their state.
- learning_curves_<dataset>.png (Fig. 4): normalised score against training step, mean +- std band
  over seeds per algorithm; the dataset's average score as a dotted line where it is known.
- flow_nll_<dataset>.png (Fig. 8): flow pre-training NLL against flow step, train (dashed) and
  validation (solid) per algorithm, mean +- std band over seeds; only where metrics.jsonl holds
  `flow/train_nll` / `flow/valid_nll` (e.g. cnf vs cnf_normal_ablation run on the same data).
- behaviour_likelihood_<dataset>.png (the mechanism of Figs. 3, 5, 6): beside the learning curves, the
  flow scripts' in-run diagnostic (cnf.py's `BehaviourLikelihood`, `diag/*` in metrics.jsonl) against
  training step: `diag/ood_rate` (the fraction of the policy's actions below the data's 1st-percentile
  log-likelihood under the run's frozen flow; the data's own 1% as a dotted line) and `diag/policy_nll`
  (the data's `diag/data_nll` as a dotted line in each algorithm's colour), mean +- std band over seeds;
  only where some run logged them. report.md gets a table of their values at each run's last evaluation.
- latent_histograms_<dataset>.png: small multiples, one row per algorithm and one column per latent
  dimension, of the policy's latents at the last evaluation (RUN_DIR/latent_histograms.jsonl, summed over
  seeds) on the fixed bins of cnf.py's LATENT_EDGES (the box [-1, 1] shaded), the data's latents outlined.
- summary.json: the numbers behind the tables (per group: per-run scores, mean, std, seeds, the paper's
  number, the dataset average), the runs left out and the directories skipped, each with its reason.

    python algorithms/report.py runs/ [more_runs/ ...] --out report/
    python algorithms/report.py runs/ --out report_fig6/ --split_by latent_clip     # Fig. 6: one column per a

Prints the table and what was left out, then `report: <path of report.md>` as the last line.

Conventions (ours; the paper does not spell them out):
- A run directory is any directory under a root that holds results.json or config.yaml (wandb's
  own folders and hidden folders are skipped). One that cannot be read (no config.yaml, empty or
  corrupt JSON or YAML, results.json without its keys, an algorithm that cannot be inferred) is
  skipped with a one-line `warning:` on stderr and listed in report.md; the report goes on.
- A run's state: `finished` when results.json exists; else status.json (which the algorithm files
  keep: state, pid, host, step) decides: `running` only while its process is alive (pid checked when
  the host is this machine; from another host, while some file in the run directory changed in the
  last 30 minutes), else `died` (killed: SIGKILL leaves "running" behind); `interrupted` and `failed`
  as status.json says. Without status.json (older runs) the 30-minute rule alone decides.
- Seeds: each (dataset, algorithm incl. --split_by variant, seed) counts once. Of several runs of one
  seed the newest finished one counts (else the newest in progress); the others are left out, and
  report.md says which. Runs that died, were interrupted or failed are left out too (report.md gives
  the `--resume` command that continues each).
- std is the population standard deviation over seeds (numpy's default, ddof = 0, as CORL's
  reports); one seed gives std 0.
- Runs in progress are included from metrics.jsonl: their evaluations are its
  `eval/normalized_score` lines, their score is the mean of their last 10 evaluations so far, and the
  table marks such cells with `*` ("includes runs in progress"); --finished_only leaves them out.
  Their dataset is `Path(dataset_path).stem` or `env` from config.yaml (the name the algorithm files
  put in results.json); their algorithm is the longest known algorithm name (the `ALGORITHM`
  constants of algorithms/*.py) that prefixes the directory name (the default run name is
  `<algorithm>-<dataset>-seed<seed>-<time>`), else the algorithm whose TrainConfig fields are closest
  to config.yaml's keys (fewest fields in one but not the other, at most 2, to survive a field added
  to a script after the run started; a tie counts as no match).
- metrics.jsonl is appended to on --resume, so a step may appear twice: the last line wins.
- Learning curves align runs on their evaluation steps; at each step the band uses the seeds that
  reached it (a run in progress stops early).
- Dataset names from D4RL file names (`hopper_medium_replay-v2`, `maze2d-umaze-sparse-v1`) are
  matched to the paper's names (`hopper-medium-replay-v2`, `maze2d-umaze-v1`) for the paper columns.
  Generated datasets (`*-gymv5`) and other files have no paper numbers: the dataset average is
  their reference.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ALGORITHMS_DIR = Path(__file__).resolve().parent

# Table 1 of the CNF paper (Akimov et al., arXiv 2211.11096, Table 1): D4RL normalised scores x 100 as
# printed there; CNF is the paper's mean +- std over 3 seeds. Column names are the algorithms' ALGORITHM
# constants upper-cased.
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
# SfBC is not in the CNF paper's Table 1: the numbers its own paper reports (Chen et al., "Offline
# Reinforcement Learning via High-Fidelity Generative Behavior Modeling", ICLR 2023).
SFBC_REPORTED = {"halfcheetah-medium-v2": "45.9", "antmaze-umaze-v0": "93.3", "antmaze-umaze-diverse-v0": "86.7"}


def paper_dataset_name(name: str) -> str | None:
    """The papers' name of a dataset, accepting d4rl's cached file stems; None if no paper reports it."""
    known = PAPER_TABLE1.keys() | SFBC_REPORTED.keys()
    if name in known:
        return name
    match = re.match(r"^(halfcheetah|hopper|walker2d)_([a-z_]+)-v2$", name)
    if match:
        candidate = f"{match[1]}-{match[2].replace('_', '-')}-v2"
        return candidate if candidate in known else None
    candidate = name.replace("-sparse-v1", "-v1")
    return candidate if candidate in known else None


def paper_score(algorithm: str, dataset: str) -> str | None:
    """The paper's number for this algorithm on this dataset (as printed), None where it reports none."""
    paper = paper_dataset_name(dataset)
    if paper is None:
        return None
    if algorithm == "sfbc":
        return SFBC_REPORTED.get(paper)
    if algorithm.upper() not in PAPER_COLUMNS or paper not in PAPER_TABLE1:
        return None
    value = PAPER_TABLE1[paper][PAPER_COLUMNS.index(algorithm.upper())]
    return None if value == "-" else value


# %% Reading runs
STALE_AFTER_S = 30 * 60  # a run whose process cannot be checked is dead after this long without a write
STOPPED_STATES = ("interrupted", "failed", "died")  # run states left out of the tables


@dataclass
class Run:
    path: Path
    algorithm: str
    dataset: str
    seed: int | None
    state: str  # "finished" | "running" | "interrupted" | "failed" | "died" (see run_state)
    score: float | None  # mean of the last 10 evaluations (None: no evaluation yet)
    evaluations: list[tuple[int, float]]  # (step, normalised score)
    flow_nll: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # "train"/"valid" -> (step, nll)
    config: dict = field(default_factory=dict)
    why: str = ""  # how the state was told (pid, host, last write, the step it stopped at)
    updated: float = 0.0  # last modification (results.json's for a finished run): the newest run of a seed wins
    dataset_score: float | None = None  # mean normalised return of the dataset's own episodes, when recorded
    diagnostics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # "ood_rate", ... -> (step, value)
    latent_histogram: dict | None = None  # the last line of latent_histograms.jsonl (edges, counts, data_counts)

    @property
    def finished(self) -> bool:
        return self.state == "finished"


class UnreadableRun(Exception):
    """A run directory the report cannot read; it is skipped with a warning."""


def known_algorithms(directory: Path = ALGORITHMS_DIR) -> dict[str, frozenset | None]:
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


def read_metrics(path: Path) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """metrics.jsonl -> (key -> {step: value}, key -> its last value on any line, with or without a step);
    a later line for the same step wins (resumed runs)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    latest: dict[str, float] = {}
    if not path.is_file():
        return series, latest
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if not isinstance(record, dict):
            continue
        step = record.pop("step", None)
        for key, value in record.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                latest[key] = float(value)
                if step is not None:
                    series[key][int(step)] = float(value)
    return series, latest


def read_last_histogram(path: Path) -> dict | None:
    """The last well-formed line of latent_histograms.jsonl (the last evaluation's), None without one."""
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if isinstance(record, dict) and {"step", "edges", "counts"} <= record.keys():
            last = record
    return last


FIELD_TOLERANCE = 2  # config.yaml may differ from its script's TrainConfig by this many fields


def infer_algorithm(run_dir: Path, config: dict, algorithms: dict[str, frozenset | None]) -> str | None:
    by_prefix = [name for name in algorithms if run_dir.name.startswith(f"{name}-")]
    if by_prefix:
        return max(by_prefix, key=len)
    # else the TrainConfig closest to config.yaml's keys: fewest fields in one and not the other,
    # at most FIELD_TOLERANCE (a field added to a script after the run started), and no tie
    distance = sorted((len(fields ^ set(config)), name) for name, fields in algorithms.items() if fields is not None)
    if distance and distance[0][0] <= FIELD_TOLERANCE and (len(distance) == 1 or distance[1][0] > distance[0][0]):
        return distance[0][1]
    return None


def read_file(path: Path, parse):
    """parse(path's text), or UnreadableRun naming the file and what is wrong with it."""
    import yaml

    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:  # ValueError: JSON and Unicode errors
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnreadableRun(f"{path.name} cannot be read ({detail})") from error


def newest_write(run_dir: Path) -> float:
    """The latest modification time of the run directory and the files directly in it."""
    times = [run_dir.stat().st_mtime] + [p.stat().st_mtime for p in run_dir.iterdir() if p.is_file()]
    return max(times)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    return True


def since(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def run_state(run_dir: Path, now: float | None = None) -> tuple[str, str]:
    """(state, why): "finished" (results.json exists), "running", or how the run stopped: "interrupted",
    "failed" (as status.json says), "died" (status.json says running but the process is gone)."""
    if (run_dir / "results.json").is_file():
        return "finished", ""
    idle = (time.time() if now is None else now) - newest_write(run_dir)
    if not (run_dir / "status.json").is_file():  # runs from before status.json: only the clock tells
        if idle < STALE_AFTER_S:
            return "running", f"no status.json; last write {since(idle)} ago"
        return "died", f"no results.json and nothing written for {since(idle)}"
    status = read_file(run_dir / "status.json", json.loads)
    if not isinstance(status, dict):
        raise UnreadableRun("status.json is not a JSON object")
    state, pid, host, step = status.get("state"), status.get("pid"), status.get("host"), status.get("step")
    at_step = f" at step {step}" if step is not None else ""
    if state == "running":
        if host == socket.gethostname():
            if isinstance(pid, int) and pid_alive(pid):
                return "running", f"pid {pid}{at_step}"
            return "died", f"status.json says running{at_step}, but pid {pid} is not alive on this host (killed?)"
        if idle < STALE_AFTER_S:
            return "running", f"pid {pid} on {host}{at_step}, last write {since(idle)} ago"
        return "died", f"status.json says running on {host}{at_step}, but nothing written for {since(idle)}"
    if state in ("interrupted", "failed"):
        error = f": {status['error']}" if status.get("error") else ""
        return state, f"{state}{at_step}{error}"
    return "died", f"status.json says {state!r}{at_step} but there is no results.json"


def read_run(run_dir: Path, algorithms: dict[str, frozenset | None], split_by: Sequence[str] = ()) -> Run:
    """One run directory; raises UnreadableRun (or KeyError, TypeError, ValueError on malformed fields)."""
    import yaml

    if not (run_dir / "config.yaml").is_file():
        raise UnreadableRun("no config.yaml")
    config = read_file(run_dir / "config.yaml", yaml.safe_load)
    if not isinstance(config, dict):
        raise UnreadableRun("config.yaml is empty or not a mapping")
    metrics, latest = read_metrics(run_dir / "metrics.jsonl")
    flow_nll = {name: sorted(metrics[f"flow/{name}_nll"].items()) for name in ("train", "valid")
                if f"flow/{name}_nll" in metrics}
    diagnostics = {key.split("/", 1)[1]: sorted(series.items()) for key, series in metrics.items()
                   if key.startswith("diag/")}
    state, why = run_state(run_dir)
    dataset_score = latest.get("dataset_normalized_score")
    if state == "finished":
        results = read_file(run_dir / "results.json", json.loads)
        missing = [key for key in ("algorithm", "dataset") if not isinstance(results, dict) or key not in results]
        if missing:
            raise UnreadableRun(f"results.json has no {' or '.join(missing)}")
        algorithm, dataset = results["algorithm"], results["dataset"]
        evaluations = [(int(e["step"]), float(e["normalized_score"])) for e in results.get("evaluations", [])]
        score = results.get("last10_mean_normalized_score")
        if isinstance(results.get("dataset_normalized_score"), (int, float)):
            dataset_score = results["dataset_normalized_score"]
        updated = (run_dir / "results.json").stat().st_mtime
    else:
        algorithm = infer_algorithm(run_dir, config, algorithms)
        if algorithm is None:
            raise UnreadableRun("no results.json and the algorithm cannot be inferred "
                                "(neither the directory name nor config.yaml's fields name one)")
        dataset = Path(config["dataset_path"]).stem if config.get("dataset_path") else config.get("env")
        if dataset is None:
            raise UnreadableRun("config.yaml names no env or dataset_path")
        evaluations = sorted(metrics.get("eval/normalized_score", {}).items())
        score = float(np.mean([s for _, s in evaluations[-10:]])) if evaluations else None
        updated = newest_write(run_dir)
    for key in split_by:  # e.g. latent_clip: one column per value
        if key in config:
            algorithm = f"{algorithm}[{key}={config[key]}]"
    return Run(path=run_dir, algorithm=algorithm, dataset=dataset, seed=config.get("seed"), state=state,
               score=None if score is None else float(score), evaluations=evaluations, flow_nll=flow_nll,
               config=config, why=why, updated=updated,
               dataset_score=None if dataset_score is None else float(dataset_score), diagnostics=diagnostics,
               latent_histogram=read_last_histogram(run_dir / "latent_histograms.jsonl"))


def find_runs(roots: Sequence[str], split_by: Sequence[str] = ()) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every readable run directory under `roots`, and (directory, reason) for each unreadable one, which
    is also reported on stderr in one `warning:` line."""
    algorithms = known_algorithms()
    runs, skipped, seen = [], [], set()
    for root in roots:
        if not Path(root).is_dir():
            raise SystemExit(f"error: {root} is not a directory")
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d != "wandb" and not d.startswith("."))
            if ("results.json" in files or "config.yaml" in files) and Path(directory).resolve() not in seen:
                seen.add(Path(directory).resolve())  # roots may overlap
                try:
                    runs.append(read_run(Path(directory), algorithms, split_by))
                except (UnreadableRun, KeyError, TypeError, ValueError, OSError) as error:
                    reason = str(error) if isinstance(error, UnreadableRun) else f"malformed ({error!r})"
                    print(f"warning: skipped run directory {directory}: {reason}", file=sys.stderr)
                    skipped.append((Path(directory), reason))
    return runs, skipped


def select_runs(runs: Sequence[Run], finished_only: bool = False) -> tuple[list[Run], list[tuple[Run, str]]]:
    """The runs the tables count, one per (dataset, algorithm, seed), and (run, reason) for the others:
    runs that stopped without results (died, interrupted, failed), runs in progress under --finished_only,
    and the older runs of a seed that has several (the newest finished one counts, else the newest)."""
    left_out: list[tuple[Run, str]] = []
    by_seed: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.state in STOPPED_STATES:
            script = run.algorithm.split("[")[0]
            resume = f"`python algorithms/{script}.py --resume {run.path}`"
            left_out.append((run, f"{run.why}; continue it with {resume}"))
        elif finished_only and not run.finished:
            left_out.append((run, "in progress (--finished_only)"))
        else:  # a run without a seed in config.yaml is its own seed
            by_seed[(run.dataset, run.algorithm, run.seed if run.seed is not None else str(run.path))].append(run)
    counted = []
    for (dataset, algorithm, seed), group in by_seed.items():
        keep = max(group, key=lambda r: (r.finished, r.updated))
        counted.append(keep)
        kind = "finished run" if keep.finished else "run"
        reason = (f"seed {seed} of {algorithm} on {dataset} again: the seed counts once, "
                  f"as {keep.path} (its newest {kind})")
        left_out += [(run, reason) for run in group if run is not keep]
    return sorted(counted, key=lambda r: str(r.path)), sorted(left_out, key=lambda item: str(item[0].path))


# %% Statistics
def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.dataset, run.algorithm)].append(run)
    return dict(groups)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof = 0) over seeds."""
    return float(np.mean(values)), float(np.std(values))


def dataset_averages(runs: Sequence[Run]) -> dict[str, float]:
    """dataset -> its episodes' mean normalised return, as the runs on it record it (their mean)."""
    known: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if run.dataset_score is not None:
            known[run.dataset].append(run.dataset_score)
    return {dataset: float(np.mean(values)) for dataset, values in known.items()}


def aligned_curve(series: Sequence[Sequence[tuple[int, float]]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per step in the union of the runs' steps: mean, std and count over the runs that have it."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for points in series:
        for step, value in points:
            by_step[step].append(value)
    steps = np.array(sorted(by_step))
    values = [by_step[s] for s in steps]
    return (steps, np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values]),
            np.array([len(v) for v in values]))


# %% Writing
def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot_bands(ax, curves: dict[str, Sequence[Sequence[tuple[int, float]]]], linestyle: str = "-",
               colors: dict[str, str] | None = None, suffix: str = "") -> None:
    for label, series in curves.items():
        steps, mean, std, _ = aligned_curve(series)
        if len(steps) == 0:
            continue
        kwargs = {"color": colors[label]} if colors else {}
        line, = ax.plot(steps, mean, linestyle, label=f"{label}{suffix} (n={len(series)})", **kwargs)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


def save_figure(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_figures(groups: dict[tuple[str, str], list[Run]], out: Path,
                  averages: dict[str, float] | None = None) -> dict[str, dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, dict[str, str]] = {"learning_curves": {}, "flow_nll": {}, "behaviour_likelihood": {},
                                          "latent_histograms": {}}
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
            if (averages or {}).get(dataset) is not None:
                ax.axhline(averages[dataset], color="gray", linestyle=":",
                           label=f"dataset average ({averages[dataset]:.1f})")
            figures["learning_curves"][dataset] = save_figure(
                fig, ax, "training step", "normalised score", f"{dataset}: learning curves (mean ± std)",
                out / f"learning_curves_{file_safe(dataset)}.png")
        nll = {kind: {a: [r.flow_nll[kind] for r in groups[(dataset, a)] if r.flow_nll.get(kind)] for a in algorithms}
               for kind in ("train", "valid")}
        nll = {kind: {a: s for a, s in per.items() if s} for kind, per in nll.items()}
        if nll["train"] or nll["valid"]:  # Fig. 8
            fig, ax = plt.subplots(figsize=(6, 4))
            plot_bands(ax, nll["train"], "--", colors, " train")
            plot_bands(ax, nll["valid"], "-", colors, " valid")
            figures["flow_nll"][dataset] = save_figure(
                fig, ax, "flow step", "negative log-likelihood", f"{dataset}: flow NLL (mean ± std)",
                out / f"flow_nll_{file_safe(dataset)}.png")
        runs = {a: groups[(dataset, a)] for a in algorithms}
        if any(r.diagnostics.get("ood_rate") for rs in runs.values() for r in rs):
            figures["behaviour_likelihood"][dataset] = behaviour_likelihood_figure(
                dataset, runs, curves, colors, (averages or {}).get(dataset), out)
        if any(r.latent_histogram for rs in runs.values() for r in rs):
            figures["latent_histograms"][dataset] = latent_histogram_figure(dataset, runs, out)
    return figures


def behaviour_likelihood_figure(dataset: str, runs: dict[str, list[Run]], curves: dict, colors: dict[str, str],
                                average: float | None, out: Path) -> str:
    """Three panels: the learning curves, diag/ood_rate and diag/policy_nll (data_nll dotted), per algorithm."""
    import matplotlib.pyplot as plt

    fig, (score_ax, ood_ax, nll_ax) = plt.subplots(1, 3, figsize=(16, 4.2))
    plot_bands(score_ax, curves, colors=colors)
    if average is not None:
        score_ax.axhline(average, color="gray", linestyle=":", label=f"dataset average ({average:.1f})")
    ood = {a: [r.diagnostics["ood_rate"] for r in rs if r.diagnostics.get("ood_rate")] for a, rs in runs.items()}
    plot_bands(ood_ax, {a: s for a, s in ood.items() if s}, colors=colors)
    ood_ax.axhline(0.01, color="gray", linestyle=":", label="the data's own actions (1%)")
    ood_ax.set_ylim(bottom=0.0)
    nll = {a: [r.diagnostics["policy_nll"] for r in rs if r.diagnostics.get("policy_nll")] for a, rs in runs.items()}
    plot_bands(nll_ax, {a: s for a, s in nll.items() if s}, colors=colors)
    for algorithm, rs in runs.items():
        reference = [r.diagnostics["data_nll"][-1][1] for r in rs if r.diagnostics.get("data_nll")]
        if reference:
            nll_ax.axhline(float(np.mean(reference)), color=colors[algorithm], linestyle=":",
                           label=f"{algorithm}: data ({np.mean(reference):.2f})")
    for ax, ylabel, title in ((score_ax, "normalised score", "learning curves"),
                              (ood_ax, "OOD rate", "actions below the data's 1st-percentile likelihood"),
                              (nll_ax, "-log pi_beta(a | s)", "policy NLL under the frozen flow")):
        ax.set(xlabel="training step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: how far the policy strays from the data (mean ± std over seeds)")
    fig.tight_layout()
    path = out / f"behaviour_likelihood_{file_safe(dataset)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def latent_histogram_figure(dataset: str, runs: dict[str, list[Run]], out: Path) -> str:
    """Small multiples: rows = algorithms, columns = latent dimensions; the last evaluation's latents as bars
    (fraction of states per bin, summed over seeds), the data's latents as an outline; bins on an index axis
    (the outer bins are wider), the box [-1, 1] shaded."""
    import matplotlib.pyplot as plt

    rows = []
    for algorithm, rs in runs.items():
        histograms = [r.latent_histogram for r in rs if r.latent_histogram]
        if not histograms:
            continue
        edges = histograms[0]["edges"]
        shape = np.shape(histograms[0]["counts"])
        same = [h for h in histograms if h["edges"] == edges and np.shape(h["counts"]) == shape]
        counts = np.sum([h["counts"] for h in same], axis=0)
        data = [h["data_counts"] for h in same if "data_counts" in h]
        rows.append((algorithm, edges, counts, np.sum(data, axis=0) if data else None, len(same)))
    n_dims = max(len(counts) for _, _, counts, _, _ in rows)
    fig, axes = plt.subplots(len(rows), n_dims, figsize=(1.9 * n_dims + 1, 1.6 * len(rows) + 0.8), squeeze=False)
    for row, (algorithm, edges, counts, data, n_runs) in enumerate(rows):
        box = [i for i, e in enumerate(edges) if -1.0 <= e <= 1.0]  # bin i spans [edges[i-1], edges[i])
        ticks = [i + 1 for i, e in enumerate(edges) if e in (-4.0, -1.0, 0.0, 1.0, 4.0)]
        labels = [f"{e:g}" for e in edges if e in (-4.0, -1.0, 0.0, 1.0, 4.0)]
        for dim in range(n_dims):
            ax = axes[row][dim]
            if dim >= len(counts):
                ax.axis("off")
                continue
            positions = np.arange(len(counts[dim])) + 0.5
            if box:
                ax.axvspan(box[0] + 1, box[-1] + 1, color="0.92", zorder=0)
            ax.bar(positions, counts[dim] / max(counts[dim].sum(), 1), width=1.0, color="C0", alpha=0.8)
            if data is not None:
                ax.step(np.arange(len(data[dim]) + 1), np.r_[data[dim], data[dim][-1]] / max(data[dim].sum(), 1),
                        where="post", color="k", linewidth=0.8)
            ax.set_xticks(ticks, labels, fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
            if row == 0:
                ax.set_title(f"z[{dim}]", fontsize=8)
            if dim == 0:
                label = algorithm.replace("[", "\n[")  # a --split_by variant on its own line
                ax.set_ylabel(f"{label}\n(n={n_runs})", fontsize=6)
    fig.suptitle(f"{dataset}: policy latents at the last evaluation (bars) and the data's (outline)", fontsize=9)
    fig.tight_layout()
    path = out / f"latent_histograms_{file_safe(dataset)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def final_diagnostics(runs: Sequence[Run]) -> dict[str, list[float]]:
    """name -> the runs' values at their last evaluation, for the runs that logged it."""
    names = ("policy_nll", "data_nll", "ood_rate", "latent_abs_max")
    return {name: [r.diagnostics[name][-1][1] for r in runs if r.diagnostics.get(name)] for name in names}


def diagnostics_table(groups: dict[tuple[str, str], list[Run]]) -> list[str]:
    """Markdown rows: per (dataset, algorithm) with in-run diagnostics, the last evaluation's values."""
    def cell(values: list[float], scale: float = 1.0, unit: str = "") -> str:
        if not values:
            return "-"
        mean, std = mean_std([scale * v for v in values])
        return f"{mean:.2f}{unit} ± {std:.2f}{unit}"

    lines = ["| dataset | algorithm | policy NLL | data NLL | OOD rate | max abs latent | runs |",
             "|---|---|---|---|---|---|---|"]
    for (dataset, algorithm), runs in sorted(groups.items()):
        final = final_diagnostics(runs)
        if not final["ood_rate"]:
            continue
        lines.append(f"| {dataset} | {algorithm} | {cell(final['policy_nll'])} | {cell(final['data_nll'])} | "
                     f"{cell(final['ood_rate'], 100.0, '%')} | {cell(final['latent_abs_max'])} | "
                     f"{len(final['ood_rate'])} |")
    return lines if len(lines) > 2 else []


def score_cell(runs: Sequence[Run]) -> str:
    scores = [r.score for r in runs if r.score is not None]
    if not scores:
        return "-"
    mean, std = mean_std(scores)
    running = "*" if any(not r.finished for r in runs if r.score is not None) else ""
    return f"{mean:.2f} ± {std:.2f} ({len(scores)}){running}"


def results_table(groups: dict[tuple[str, str], list[Run]], averages: dict[str, float]) -> list[str]:
    """Markdown rows: per algorithm our cell, then the paper's number where it reports any on these
    datasets; a last column with the dataset's average score where any is known."""
    datasets = sorted({d for d, _ in groups})
    algorithms = sorted({a for _, a in groups})
    with_paper = {a for a in algorithms if any(paper_score(a, d) for d in datasets)}
    header = [name for a in algorithms for name in ([a, f"{a} (paper)"] if a in with_paper else [a])]
    header += ["dataset average"] if averages else []
    lines = ["| dataset | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for dataset in datasets:
        cells = []
        for a in algorithms:
            cells.append(score_cell(groups.get((dataset, a), [])))
            if a in with_paper:
                cells.append(paper_score(a, dataset) or "-")
        if averages:
            cells.append(f"{averages[dataset]:.2f}" if dataset in averages else "-")
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return lines


def write_report(runs: Sequence[Run], out: Path, left_out: Sequence[tuple[Run, str]] = (),
                 skipped: Sequence[tuple[Path, str]] = ()) -> Path:
    """report.md, the PNGs and summary.json from the counted runs (select_runs), the runs left out and
    the unreadable directories (find_runs)."""
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    averages = dataset_averages(runs)
    figures = write_figures(groups, out, averages)

    table = results_table(groups, averages)
    legend = ("Normalised score: mean ± std (population, ddof = 0) over seeds of each run's mean of its last 10 "
              "evaluations; (n) = the number of distinct seeds in the cell (several runs of one seed count once: "
              "its newest finished run); `*` = includes runs in progress (score so far).")
    if "(paper) |" in table[0]:
        legend += " `<algorithm> (paper)`: the CNF paper's Table 1 (SfBC: its own paper)."
    if averages:
        legend += " dataset average: the mean normalised return of the dataset's own episodes."
    lines = ["# Results", "", legend, "", *table]
    if left_out:
        lines += ["", f"Left out of the table ({len(left_out)} runs):", ""]
        lines += [f"- `{run.path}` ({run.algorithm}, {run.dataset}, seed {run.seed}): {reason}"
                  for run, reason in left_out]
    if skipped:
        lines += ["", f"Unreadable run directories, skipped ({len(skipped)}):", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in skipped]
    diagnostics = diagnostics_table(groups)
    if diagnostics:
        lines += ["", "## Behaviour likelihood (last evaluation)", "",
                  "How far each policy's evaluation actions stray from the data, under its run's frozen flow "
                  "(cnf.py's `BehaviourLikelihood`): mean -log pi_beta(a | s) of the policy's actions and of the "
                  "data's own at 10k fixed dataset states, the fraction of policy actions below the data's "
                  "1st-percentile log-likelihood (the data itself: 1%), and the largest |latent|; mean ± std over "
                  "runs. Each run's flow is its own (a Normal ablation's is Normal-latent): compare NLLs against "
                  "the row's data NLL; `python algorithms/behavior_likelihood.py` scores runs under one flow.", "",
                  *diagnostics]
    in_paper = sorted({paper_dataset_name(d) for d, _ in groups} & PAPER_TABLE1.keys())
    if in_paper:
        lines += ["", "## Paper, Table 1 (reference)", "",
                  "| dataset | " + " | ".join(PAPER_COLUMNS) + " |", "|---|" + "---|" * len(PAPER_COLUMNS)]
        lines += [f"| {paper} | " + " | ".join(PAPER_TABLE1[paper]) + " |" for paper in in_paper]
    for title, kind in (("Learning curves (Fig. 4)", "learning_curves"), ("Flow NLL (Fig. 8)", "flow_nll"),
                        ("Behaviour likelihood (Figs. 3, 5, 6)", "behaviour_likelihood"),
                        ("Latent histograms, last evaluation", "latent_histograms")):
        if figures[kind]:
            lines += ["", f"## {title}", ""] + [f"![{d}]({name})" for d, name in sorted(figures[kind].items())]
    lines += ["", "## Runs", "",
              "| run | algorithm | dataset | seed | state | counted | evaluations | last evaluation | score |",
              "|---|---|---|---|---|---|---|---|---|"]
    listed = [(run, True) for run in runs] + [(run, False) for run, _ in left_out]
    for run, counted in sorted(listed, key=lambda item: (item[0].dataset, item[0].algorithm, str(item[0].seed),
                                                          str(item[0].path))):
        last = run.evaluations[-1][0] if run.evaluations else "-"
        score = f"{run.score:.2f}" if run.score is not None else "-"
        state = run.state if run.finished or not run.why else f"{run.state} ({run.why})"
        lines.append(f"| {run.path} | {run.algorithm} | {run.dataset} | {run.seed} | {state} | "
                     f"{'yes' if counted else 'no'} | {len(run.evaluations)} | {last} | {score} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")

    summary = {}
    for (d, a), rs in sorted(groups.items()):
        scores = [r.score for r in rs if r.score is not None]
        mean, std = mean_std(scores) if scores else (None, None)
        summary[f"{d}|{a}"] = {"dataset": d, "algorithm": a, "scores": scores, "seeds": [r.seed for r in rs],
                               "running": sum(not r.finished for r in rs), "mean": mean, "std": std,
                               "paper": paper_score(a, d), "dataset_normalized_score": averages.get(d),
                               "diagnostics": final_diagnostics(rs)}
    (out / "summary.json").write_text(json.dumps({
        "groups": summary, "figures": figures,
        "left_out": [{"path": str(run.path), "state": run.state, "reason": reason} for run, reason in left_out],
        "skipped": [{"path": str(p), "reason": reason} for p, reason in skipped]}, indent=1))
    return path


def make_report(roots: Sequence[str], out: str, finished_only: bool = False, split_by: Sequence[str] = ()) -> Path:
    """Read, select and write (find_runs, select_runs, write_report); print the table and what was left out."""
    runs, skipped = find_runs(roots, split_by)
    if not runs:
        where = ", ".join(map(str, roots))
        raise SystemExit(f"error: no readable run directories under {where} ({len(skipped)} skipped, see above)"
                         if skipped else f"error: no run directories (with results.json or config.yaml) under {where}")
    counted, left_out = select_runs(runs, finished_only)
    path = write_report(counted, Path(out), left_out, skipped)
    print(path.read_text().split("\n## ")[0].rstrip())  # the table, then what was left out
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="+", help="folders holding run directories (searched recursively)")
    parser.add_argument("--out", default="report", help="output folder for report.md, PNGs and summary.json")
    parser.add_argument("--finished_only", action="store_true", help="leave out runs without results.json")
    parser.add_argument("--split_by", nargs="*", default=[],
                        help="config.yaml fields whose value is appended to the algorithm (e.g. latent_clip)")
    args = parser.parse_args(argv)
    return make_report(args.roots, args.out, args.finished_only, args.split_by)


if __name__ == "__main__":
    print(f"report: {main(sys.argv[1:])}")
