"""Run a grid of experiments (Table 1: algorithms x datasets x seeds) on Slurm or a local pool, then report it.

Companion tool to Akimov et al., "Let Offline RL Flow: Training Conservative Agents in the Latent Space
of Normalizing Flows" (arXiv 2211.11096). Expands --algorithms x --datasets x --seeds into runs named
`<algorithm>-<dataset>-seed<seed>` under one --checkpoints_path. CNF's seeds of one dataset are one job,
`cnf.py --seeds 0 1 2` (one process, one pre-trained flow shared by the seeds, their agents in one batched
update; one run directory per seed all the same; `--separate_seeds` makes them separate jobs). For each run
(or CNF seed group):

- results.json exists: skipped (finished);
- the run is alive (report.py's rule: status.json's pid on this host, else a write in the last 30 min):
  skipped, so that a second sweep does not start a run that is still training;
- config.yaml but no results.json (killed, timed out, pre-empted, failed): continued with
  `python algorithms/<algorithm>.py --resume RUN_DIR`;
- otherwise started: `python algorithms/<algorithm>.py [--config_path YAML] [--env NAME | --dataset_path FILE]
  --seed S --checkpoints_path DIR --run_name NAME`.

Each run is one job of `submitit` (https://github.com/facebookincubator/submitit): `--launcher slurm`
submits them as one Slurm job array (one job per run, --array_parallelism at a time); `--launcher local`
runs them in a pool of --workers local processes (submitit's LocalExecutor). A job decides between start
and --resume when it starts, not when it is submitted, so a job that Slurm requeues (pre-emption, or
submitit's own requeue at the time limit, up to --max_requeues times) continues its run from the last
checkpoint. Rerunning the same sweep command skips finished runs and resumes stopped ones; on Slurm, rerun
it only once the jobs it submitted have left the queue (squeue), since a queued run has no directory yet.
When the runs are done (local; Slurm with --wait) the report is written with report.py (imported: run
states and the report itself come from there): report.md with Table 1 beside the paper's, the learning
curves (Fig. 4), summary.json.

Datasets: `table1` (the default) is the paper's 12 Table-1 datasets; any other name is passed as --env
(D4RL names, `<env>-<level>-gymv5`, ...); a path ending in .hdf5/.h5 is passed as --dataset_path (its
file stem names the run). Each run's settings: with --preset NAME, algorithms/configs/<algorithm>/NAME.yaml
(or NAME itself, a YAML file) plus the dataset; else the per-dataset YAML
algorithms/configs/<algorithm>/<dataset>.yaml when there is one (the paper's values per dataset); else the
script's defaults. Flags after `--` go to every run, resumed ones included (they override config.yaml).

    python algorithms/sweep.py --algorithms awac iql --datasets halfcheetah-medium-gymv5 --seeds 0 1 \\
        --launcher local --workers 2 --checkpoints_path runs/quick --out report/quick -- --train_steps 20000
    python algorithms/sweep.py --checkpoints_path runs/table1 --out report/table1 --launcher slurm \\
        --partition gpu --gpus_per_job 1 --time_min 1440 --wait
    python algorithms/sweep.py --dry_run ...    # the plan and every command, nothing started

The runs use this interpreter (--python changes it, e.g. to a container's), so jobs need no environment
setup beyond what --setup lines give them (e.g. "module load cuda").

CNF here pre-trains its own flow per run with the official run config; the paper's random search over
flow pre-training (cnf_flow_search.py) is a separate step (README, "Reproducing the paper").
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import report

ALGORITHMS_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = ALGORITHMS_DIR / "configs"
TABLE1_ALGORITHMS = [c.lower() for c in report.PAPER_COLUMNS if (ALGORITHMS_DIR / f"{c.lower()}.py").is_file()]
SWEEP_FLAGS = ("--seed", "--seeds", "--run_name", "--checkpoints_path", "--resume")  # set per run by the sweep
SEEDS_IN_ONE_PROCESS = ("cnf",)  # scripts whose --seeds trains several seeds in one process
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # submitit's local jobs need a time limit; no run should meet this one


# %% The grid
@dataclass(frozen=True)
class RunSpec:
    algorithm: str
    dataset: str  # as in the run name (file-safe)
    seed: int
    run_dir: Path  # absolute
    data_args: tuple[str, ...]  # --config_path / --env / --dataset_path, absolute paths
    extra_args: tuple[str, ...] = ()  # the flags after `--`
    group: tuple[int, ...] = ()  # a seed group (`--seeds`, one process): all its seeds; `seed` is the first

    @property
    def run_dirs(self) -> list[Path]:
        """Every run directory the job writes: one, or one per seed of a group."""
        group = [self.run_dir.with_name(f"{self.algorithm}-{self.dataset}-seed{s}") for s in self.group]
        return group or [self.run_dir]

    @property
    def name(self) -> str:
        seeds = ",".join(map(str, self.group))
        return f"{self.algorithm}-{self.dataset}-seed{seeds}" if self.group else self.run_dir.name


def dataset_arguments(algorithm: str, dataset: str, preset: str | None = None,
                      configs_dir: Path = CONFIGS_DIR) -> tuple[str, list[str]]:
    """(name in the run name, the script's flags that choose the data and the settings) for one algorithm."""
    if dataset.endswith((".hdf5", ".h5")):
        if not Path(dataset).is_file():
            raise SystemExit(f"error: --datasets {dataset}: no such file")
        name, data = Path(dataset).stem, ["--dataset_path", str(Path(dataset).resolve())]
    else:
        name, data = dataset, ["--env", dataset]
    if preset is not None:
        path = Path(preset) if preset.endswith((".yaml", ".yml")) else configs_dir / algorithm / f"{preset}.yaml"
        if not path.is_file():
            raise SystemExit(f"error: --preset {preset}: {path} does not exist")
        return report.file_safe(name), ["--config_path", str(path.resolve()), *data]
    per_dataset = configs_dir / algorithm / f"{name}.yaml"
    if data[0] == "--env" and per_dataset.is_file():  # the paper's settings for this dataset; it names the env
        return report.file_safe(name), ["--config_path", str(per_dataset.resolve())]
    return report.file_safe(name), data


def expand_runs(algorithms: list[str], datasets: list[str], seeds: list[int], checkpoints_path: str,
                preset: str | None = None, extra_args: tuple[str, ...] = (),
                configs_dir: Path = CONFIGS_DIR, separate_seeds: bool = False) -> list[RunSpec]:
    """algorithms x datasets x seeds, dataset-major; `table1` among the datasets stands for Table 1's twelve.
    A script that trains several seeds in one process gets one RunSpec per dataset (a seed group)."""
    names = [d for entry in datasets for d in (report.PAPER_TABLE1 if entry == "table1" else [entry])]
    root = Path(checkpoints_path).resolve()
    runs = []
    for dataset in dict.fromkeys(names):  # in order, once each
        for algorithm in algorithms:
            name, data_args = dataset_arguments(algorithm, dataset, preset, configs_dir)
            if algorithm in SEEDS_IN_ONE_PROCESS and len(seeds) > 1 and not separate_seeds:
                runs.append(RunSpec(algorithm, name, seeds[0], root / f"{algorithm}-{name}-seed{seeds[0]}",
                                    tuple(data_args), tuple(extra_args), group=tuple(seeds)))
                continue
            runs += [RunSpec(algorithm, name, seed, root / f"{algorithm}-{name}-seed{seed}", tuple(data_args),
                             tuple(extra_args)) for seed in seeds]
    return runs


def run_action(run: RunSpec) -> tuple[str, str]:
    """What the sweep does with a run (or a seed group: all its directories) now: ("skip" | "resume" | "start",
    why)."""
    if not run.run_dir.is_dir():
        return "start", "new"
    states = []
    for run_dir in run.run_dirs:
        try:
            states.append(report.run_state(run_dir) if run_dir.is_dir() else ("new", ""))
        except report.UnreadableRun as error:  # e.g. a status.json cut by a crash: the run is not alive
            states.append(("died", str(error)))
    if all(state == "finished" for state, _ in states):
        return "skip", "finished"
    if any(state == "running" for state, _ in states):
        return "skip", f"running ({next(why for state, why in states if state == 'running')})"
    state, why = next((state, why) for state, why in states if state != "finished")
    if (run.run_dir / "config.yaml").is_file():
        return "resume", f"{state}: {why}" if why else state
    return "start", f"{state}, no config.yaml yet"


def run_command(run: RunSpec, python: str = sys.executable) -> list[str] | None:
    """The command that moves `run` on, decided from its directory now: None when it is finished,
    `--resume RUN_DIR` when it has a config.yaml, else a fresh start under its deterministic name."""
    script = [*shlex.split(python), str(ALGORITHMS_DIR / f"{run.algorithm}.py")]
    if all((run_dir / "results.json").is_file() for run_dir in run.run_dirs):
        return None
    if (run.run_dir / "config.yaml").is_file():  # a group resumes all its seeds from any one directory
        return [*script, "--resume", str(run.run_dir), *run.extra_args]
    if run.group:
        return [*script, *run.data_args, "--seeds", *map(str, run.group), "--checkpoints_path",
                str(run.run_dir.parent), "--run_name", f"{run.algorithm}-{run.dataset}", *run.extra_args]
    return [*script, *run.data_args, "--seed", str(run.seed), "--checkpoints_path", str(run.run_dir.parent),
            "--run_name", run.run_dir.name, *run.extra_args]


# %% Jobs
@dataclass
class RunJob:
    """One run as a submitit job. submitit pickles it (cloudpickle, by value: this module need not be
    importable where the job runs) and calls it in the job; `checkpoint` makes a job that Slurm stops at
    its time limit requeue itself, and the requeued call resumes the run."""
    run: RunSpec
    python: str = sys.executable
    environment: dict = field(default_factory=dict)  # variables set (None: removed) for the run's process

    def __call__(self) -> str:
        command = run_command(self.run, self.python)
        if command is not None:
            env = {**os.environ, **{k: v for k, v in self.environment.items() if v is not None}}
            for key in [k for k, v in self.environment.items() if v is None]:
                env.pop(key, None)
            print(f"$ {shlex.join(command)}", flush=True)
            process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
            last = b""
            for line in process.stderr:  # to the job's log as it comes; keep the last line for the error
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
                last = line.split(b"\r")[-1].strip() or last
            if process.wait() != 0:
                raise RuntimeError(f"exit status {process.returncode}: {last.decode(errors='replace')}")
        return str(self.run.run_dir / "results.json")

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def extra_parameters(pairs: list[str]) -> dict:
    """--slurm_extra KEY=VALUE ... (KEY alone: a flag) -> sbatch parameters."""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        extra[key.lstrip("-")] = value if sep else True
    return extra


def slurm_parameters(args: argparse.Namespace) -> dict:
    """AutoExecutor.update_parameters keywords: one single-task job per run, the array --array_parallelism wide."""
    parameters = {"name": args.job_name, "timeout_min": args.time_min, "nodes": 1, "tasks_per_node": 1,
                  "gpus_per_node": args.gpus_per_job, "cpus_per_task": args.cpus_per_job, "mem_gb": args.mem_gb,
                  "slurm_partition": args.partition, "slurm_array_parallelism": args.array_parallelism,
                  "slurm_signal_delay_s": args.signal_delay_s, "slurm_setup": args.setup or None,
                  "slurm_additional_parameters": extra_parameters(args.slurm_extra) or None}
    return {key: value for key, value in parameters.items() if value is not None}


def make_executor(args: argparse.Namespace, folder: Path):
    import cloudpickle
    import submitit

    if __name__ != "__main__":  # imported (the tests): pickle RunJob by value all the same (see RunJob)
        cloudpickle.register_pickle_by_value(sys.modules[__name__])

    if args.launcher == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
        executor.update_parameters(**slurm_parameters(args))
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    return executor


def outcome(job: RunJob, handle) -> str | None:
    """None when the job's run finished, else one line saying what went wrong and where its log is."""
    import submitit

    try:
        handle.result()
        return None
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
        parts = str(error).split("-" * 22)  # FailedJobError: "... ---- <the job's traceback> ---- ..."
        last = (parts[1] if len(parts) > 2 else str(error)).strip().splitlines()[-1]
        return f"{job.run.name}: {last.removeprefix('RuntimeError: ')} (log: {handle.paths.stderr})"


def launch(jobs: list[RunJob], executor, workers: int | None, poll_s: float = 0.5) -> list[str]:
    """Submit the jobs (at most `workers` at a time; None: all at once, as one Slurm array) and wait for them;
    returns one line per failed run. Ctrl-C cancels the jobs still running."""
    failures, handles, pending = [], [], list(jobs)
    try:
        if workers is None:
            with executor.batch():
                handles = [(job, executor.submit(job)) for job in pending]
            pending = []
        while pending or handles:
            while pending and len(handles) < workers:
                job = pending.pop(0)
                handles.append((job, executor.submit(job)))
                print(f"started  {job.run.name}", flush=True)
            time.sleep(poll_s)
            for job, handle in [item for item in handles if item[1].done()]:
                handles.remove((job, handle))
                failure = outcome(job, handle)
                print(f"failed   {failure}" if failure else f"finished {job.run.name}", flush=True)
                failures += [failure] if failure else []
    except KeyboardInterrupt:
        for _, handle in handles:
            handle.cancel()
        raise SystemExit("interrupted: the runs stopped where they were; the same command resumes them") from None
    return failures


# %% Command line
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s [options] [-- flags for every run]")
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--algorithms", nargs="+", default=TABLE1_ALGORITHMS,
                      help=f"algorithm scripts (default: Table 1's, {' '.join(TABLE1_ALGORITHMS)})")
    grid.add_argument("--datasets", nargs="+", default=["table1"],
                      help="`table1` (Table 1's 12 datasets), --env names, or .hdf5 files (default: table1)")
    grid.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default: 0 1 2)")
    grid.add_argument("--separate_seeds", action="store_true",
                      help=f"one job per seed for {', '.join(SEEDS_IN_ONE_PROCESS)} too (default: its seeds of one "
                           f"dataset are one `--seeds` job, one process over one flow)")
    grid.add_argument("--preset", help="algorithms/configs/<algorithm>/PRESET.yaml (or a YAML file) for every run, "
                                       "instead of the per-dataset YAMLs")
    grid.add_argument("--checkpoints_path", default="runs/sweep", help="where the run directories go")
    grid.add_argument("--out", default="report", help="report folder (report.md, PNGs, summary.json)")
    grid.add_argument("--python", default=sys.executable,
                      help="the command that runs the scripts (default: this interpreter), e.g. "
                           "'apptainer exec --nv cnf.sif python' for the Docker image's D4RL stack")
    grid.add_argument("--dry_run", action="store_true", help="print what would run, and run nothing")
    launcher = parser.add_argument_group("launcher")
    launcher.add_argument("--launcher", choices=("local", "slurm"), default="local")
    launcher.add_argument("--workers", type=int, default=1, help="local: runs at a time (default 1)")
    slurm = parser.add_argument_group("slurm (one job per run, submitted as one job array)")
    slurm.add_argument("--partition", help="sbatch --partition")
    slurm.add_argument("--gpus_per_job", type=int, default=1, help="(default 1)")
    slurm.add_argument("--cpus_per_job", type=int, default=4, help="(default 4)")
    slurm.add_argument("--mem_gb", type=float, help="memory per job")
    slurm.add_argument("--time_min", type=int, default=24 * 60,
                       help="time limit per job, minutes (default 1440); a run that needs longer is requeued and "
                            "resumes from its last checkpoint")
    slurm.add_argument("--max_requeues", type=int, default=10, help="requeues at the time limit per job (default 10)")
    slurm.add_argument("--array_parallelism", type=int, default=64, help="jobs of the array at a time (default 64)")
    slurm.add_argument("--signal_delay_s", type=int, default=120,
                       help="seconds between submitit's timeout signal and the kill (default 120)")
    slurm.add_argument("--job_name", default="cnf-sweep")
    slurm.add_argument("--setup", nargs="*", default=[],
                       help='shell lines run before each job, e.g. "source .venv/bin/activate"')
    slurm.add_argument("--slurm_extra", nargs="*", default=[], metavar="KEY=VALUE",
                       help="more sbatch parameters, e.g. account=my_account qos=high (KEY alone: a flag)")
    slurm.add_argument("--wait", action="store_true", help="wait for the Slurm jobs, then write the report")
    args = parser.parse_args(own)

    known = report.known_algorithms()
    unknown = [a for a in args.algorithms if a not in known or not (ALGORITHMS_DIR / f"{a}.py").is_file()]
    if unknown:
        raise SystemExit(f"error: --algorithms {' '.join(unknown)}: not an algorithm script; "
                         f"known: {' '.join(sorted(a for a in known if (ALGORITHMS_DIR / f'{a}.py').is_file()))}")
    if args.workers < 1:
        raise SystemExit(f"error: --workers must be at least 1, not {args.workers}")
    set_per_run = [flag for flag in extra if flag.split("=")[0] in SWEEP_FLAGS]
    if set_per_run:
        raise SystemExit(f"error: {' '.join(set_per_run)} after `--`: the sweep sets it per run "
                         f"(use --seeds, --checkpoints_path)")
    return args, extra


def main(argv: list[str] | None = None) -> Path | None:
    """Plan, launch, report; returns report.md's path (None: nothing reported yet, e.g. Slurm without --wait)."""
    args, extra = parse_args(sys.argv[1:] if argv is None else list(argv))
    runs = expand_runs(args.algorithms, args.datasets, args.seeds, args.checkpoints_path, args.preset, extra,
                       separate_seeds=args.separate_seeds)
    todo = []
    for run in runs:
        action, why = run_action(run)
        print(f"{action:<8} {run.name}  ({why})")
        if action != "skip":
            todo.append(run)
    print(f"{len(runs)} jobs: {len(todo)} to run, {len(runs) - len(todo)} skipped", flush=True)
    if args.dry_run:
        for run in todo:
            print(f"$ {shlex.join(run_command(run, args.python))}")
        return None
    failures = []
    if todo:
        # the local executor hides the GPUs (CUDA_VISIBLE_DEVICES="") unless told otherwise: give the runs ours
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        environment = {"CUDA_VISIBLE_DEVICES": gpus} if args.launcher == "local" else {}
        jobs = [RunJob(run, args.python, environment) for run in todo]
        executor = make_executor(args, Path(args.checkpoints_path) / ".submitit")  # hidden: report.py skips it
        if args.launcher == "slurm" and not args.wait:
            with executor.batch():
                handles = [executor.submit(job) for job in jobs]
            print(f"submitted {len(handles)} Slurm jobs ({handles[0].job_id.split('_')[0]}); when they are done: "
                  f"python algorithms/report.py {args.checkpoints_path} --out {args.out}")
            return None
        local = args.launcher == "local"
        failures = launch(jobs, executor, args.workers if local else None, poll_s=0.5 if local else 60)
    try:
        path = report.make_report([args.checkpoints_path], args.out)
        print(f"report: {path}", flush=True)
    except SystemExit as error:  # nothing to report: say so, and why the runs failed
        if not failures:
            raise
        print(error, file=sys.stderr)
        path = None
    if failures:
        raise SystemExit(f"error: {len(failures)} of {len(todo)} runs failed (the same command retries them, "
                         f"resuming where they stopped):\n"
                         + "\n".join(failures))
    return path


if __name__ == "__main__":
    main()
