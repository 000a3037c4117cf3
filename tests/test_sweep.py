"""algorithms/sweep.py: the grid and its names, skip/resume decisions, the Slurm job array it submits (through
fake sbatch/srun), and end to end on submitit's local executor: 2 algorithms x 1 tiny dataset x 2 seeds, then a
run stopped mid-way finished by a second sweep."""
import json
import os
import pickle
import socket
import subprocess
import sys

import pytest

import sweep
from conftest import ROOT, write_tiny_hdf5
from test_report import backdate, dead_pid, table_rows

CONFIGS = ROOT / "algorithms" / "configs"
TINY_RUN_FLAGS = ["--train_steps", "40", "--eval_every", "20", "--eval_episodes", "2", "--batch_size", "32",
                  "--wandb_mode", "disabled", "--device", "cpu", "--cpu_threads", "1"]


def test_expand_runs_names_and_arguments(tmp_path):
    data = write_tiny_hdf5(tmp_path / "tiny-gymv5.hdf5")
    runs = sweep.expand_runs(["awac", "iql"], ["hopper-medium-v2", "halfcheetah-medium-gymv5", data,
                                               "mujoco/hopper/medium-v0"], [0, 2], str(tmp_path / "runs"),
                             extra_args=["--device", "cpu"])
    assert len(runs) == 2 * 4 * 2 and len({r.run_dir for r in runs}) == len(runs)
    by_name = {r.run_dir.name: r for r in runs}
    assert list(by_name)[:4] == ["awac-hopper-medium-v2-seed0", "awac-hopper-medium-v2-seed2",
                                 "iql-hopper-medium-v2-seed0", "iql-hopper-medium-v2-seed2"]
    assert all(r.run_dir.parent == (tmp_path / "runs").resolve() and r.extra_args == ("--device", "cpu") for r in runs)
    # a D4RL name with a per-dataset YAML: the paper's settings, which name the env themselves
    yaml_path = str(CONFIGS / "iql/hopper-medium-v2.yaml")
    assert by_name["iql-hopper-medium-v2-seed2"].data_args == ("--config_path", yaml_path)
    assert by_name["awac-halfcheetah-medium-gymv5-seed0"].data_args == ("--env", "halfcheetah-medium-gymv5")
    assert by_name["awac-tiny-gymv5-seed0"].data_args == ("--dataset_path", data)
    assert by_name["iql-mujoco_hopper_medium-v0-seed0"].data_args == ("--env", "mujoco/hopper/medium-v0")  # file-safe
    quick = sweep.expand_runs(["awac"], ["hopper-medium-v2"], [1], "runs", preset="quick")[0]
    assert quick.data_args == ("--config_path", str(CONFIGS / "awac/quick.yaml"), "--env", "hopper-medium-v2")
    table1 = sweep.expand_runs(sweep.TABLE1_ALGORITHMS, ["table1"], [0, 1, 2], "runs")
    assert len(table1) == 12 * (len(sweep.TABLE1_ALGORITHMS) - 1) * 3 + 12 and {"cnf", "awac", "iql", "plas"} <= {
        r.algorithm for r in table1}  # CNF: one job per dataset, its three seeds in one process
    assert all(r.data_args[0] == "--config_path" for r in table1)  # every Table-1 cell has its YAML
    with pytest.raises(SystemExit, match="no such file"):
        sweep.expand_runs(["awac"], [str(tmp_path / "missing.hdf5")], [0], "runs")
    with pytest.raises(SystemExit, match="nothing.yaml does not exist"):
        sweep.expand_runs(["awac"], ["hopper-medium-v2"], [0], "runs", preset="nothing")


def test_run_actions_and_commands(tmp_path):
    runs = {name: sweep.RunSpec("iql", "hopper-medium-v2", 0, tmp_path / name, ("--env", "hopper-medium-v2"),
                                ("--device", "cpu")) for name in
            ("new", "finished", "killed", "alive", "dead_pid", "corrupt_status", "no_config")}
    here = socket.gethostname()
    for name, status in (("finished", None), ("killed", None), ("alive", {"pid": os.getpid()}),
                         ("dead_pid", {"pid": dead_pid()}), ("corrupt_status", None), ("no_config", None)):
        run_dir = runs[name].run_dir
        run_dir.mkdir()
        if name != "no_config":
            (run_dir / "config.yaml").write_text("env: hopper-medium-v2\nseed: 0\n")
        if status is not None:
            (run_dir / "status.json").write_text(json.dumps({"state": "running", "host": here, "step": 20, **status}))
    (runs["finished"].run_dir / "results.json").write_text("{}")
    (runs["corrupt_status"].run_dir / "status.json").write_text("{")
    (runs["no_config"].run_dir / "metrics.jsonl").write_text("")
    for name in ("killed", "no_config", "alive"):  # no sign of life for an hour (alive: its pid says otherwise)
        backdate(runs[name].run_dir, 3600)
    actions = {name: sweep.run_action(run)[0] for name, run in runs.items()}
    assert actions == {"new": "start", "finished": "skip", "killed": "resume", "alive": "skip", "dead_pid": "resume",
                       "corrupt_status": "resume", "no_config": "start"}
    assert "not alive" in sweep.run_action(runs["dead_pid"])[1] and "running" in sweep.run_action(runs["alive"])[1]

    script = str(ROOT / "algorithms" / "iql.py")
    assert sweep.run_command(runs["finished"], "py") is None
    assert sweep.run_command(runs["killed"], "py") == ["py", script, "--resume", str(tmp_path / "killed"),
                                                       "--device", "cpu"]
    assert sweep.run_command(runs["new"], "py") == ["py", script, "--env", "hopper-medium-v2", "--seed", "0",
                                                    "--checkpoints_path", str(tmp_path), "--run_name", "new",
                                                    "--device", "cpu"]


def test_cnf_seeds_of_a_dataset_are_one_job_that_resumes_them_all(tmp_path, capsys):
    """cnf.py's seeds of one dataset: one `--seeds` job (one flow, one process), its directories named as
    separate runs' would be; a stopped group is resumed from its first seed's directory; finished when all are."""
    [group] = sweep.expand_runs(["cnf"], ["hopper-medium-gymv5"], [0, 1, 2], str(tmp_path))
    assert group.group == (0, 1, 2) and group.name == "cnf-hopper-medium-gymv5-seed0,1,2"
    assert [d.name for d in group.run_dirs] == [f"cnf-hopper-medium-gymv5-seed{s}" for s in (0, 1, 2)]
    script = str(ROOT / "algorithms" / "cnf.py")
    assert sweep.run_action(group)[0] == "start"
    assert sweep.run_command(group, "py") == ["py", script, "--env", "hopper-medium-gymv5", "--seeds", "0", "1", "2",
                                              "--checkpoints_path", str(tmp_path), "--run_name",
                                              "cnf-hopper-medium-gymv5"]
    for run_dir in group.run_dirs:  # a stopped group: config.yaml everywhere, one seed already finished
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("seed: 0\n")
    (group.run_dirs[1] / "results.json").write_text("{}")
    for run_dir in group.run_dirs:
        backdate(run_dir, 3600)
    assert sweep.run_action(group)[0] == "resume"
    assert sweep.run_command(group, "py") == ["py", script, "--resume", str(group.run_dirs[0])]
    for run_dir in group.run_dirs:
        (run_dir / "results.json").write_text("{}")
    assert sweep.run_action(group) == ("skip", "finished") and sweep.run_command(group, "py") is None
    separate = sweep.expand_runs(["cnf"], ["hopper-medium-gymv5"], [0, 1], str(tmp_path), separate_seeds=True)
    assert [r.group for r in separate] == [(), ()]
    sweep.main(["--dry_run", "--algorithms", "cnf", "iql", "--datasets", "hopper-medium-gymv5", "--seeds", "0", "1",
                "--checkpoints_path", str(tmp_path / "dry")])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 3 and "--seeds 0 1" in commands[0] and "--seed 0" in commands[1]


def test_command_line_errors(tmp_path):
    for argv, message in ((["--algorithms", "nope"], "--algorithms nope: not an algorithm script"),
                          (["--workers", "0"], "--workers must be at least 1"),
                          (["--", "--seed", "3"], "--seed after `--`: the sweep sets it per run"),
                          (["--", "--seeds", "3", "4"], "--seeds after `--`: the sweep sets it per run")):
        with pytest.raises(SystemExit, match=message):
            sweep.main(["--dry_run", "--checkpoints_path", str(tmp_path), *argv])


def fake_slurm(tmp_path, monkeypatch):
    """`srun` and `sbatch` on PATH: sbatch keeps each submission file and answers with job id 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "submitted.sh"


def test_slurm_job_array_parameters(tmp_path, monkeypatch, capsys):
    slurm_flags = ["--launcher", "slurm", "--partition", "gpu", "--gpus_per_job", "1", "--cpus_per_job", "6",
                   "--mem_gb", "32", "--time_min", "90", "--array_parallelism", "3", "--max_requeues", "7",
                   "--setup", "source .venv/bin/activate", "--slurm_extra", "account=proj", "requeue"]
    args, extra = sweep.parse_args(slurm_flags + ["--", "--device", "cuda"])
    assert extra == ["--device", "cuda"]
    assert sweep.slurm_parameters(args) == {
        "name": "cnf-sweep", "timeout_min": 90, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1,
        "cpus_per_task": 6, "mem_gb": 32.0, "slurm_partition": "gpu", "slurm_array_parallelism": 3,
        "slurm_signal_delay_s": 120, "slurm_setup": ["source .venv/bin/activate"],
        "slurm_additional_parameters": {"account": "proj", "requeue": True}}

    submitted = fake_slurm(tmp_path, monkeypatch)
    root = tmp_path / "runs"
    grid = ["--algorithms", "awac", "iql", "--datasets", "hopper-medium-v2", "walker2d-medium-v2", "--seeds", "0", "1"]
    assert sweep.main([*grid, "--checkpoints_path", str(root), *slurm_flags, "--", "--device", "cuda"]) is None
    assert "submitted 8 Slurm jobs (4242)" in capsys.readouterr().out
    sbatch = submitted.read_text().splitlines()
    for line in ("#SBATCH --array=0-7%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --mem=32GB", "#SBATCH --time=90", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --account=proj", "#SBATCH --requeue", "#SBATCH --signal=USR2@120",
                 "#SBATCH --job-name=cnf-sweep", "source .venv/bin/activate"):
        assert line in sbatch
    # each array task's pickle: a RunJob, loadable where algorithms/ is not importable (pickled by value),
    # whose requeue (checkpoint) resubmits itself, so the requeued job resumes its run
    pickles = sorted((root / ".submitit").glob("4242_*_submitted.pkl"))
    assert len(pickles) == 8
    show = ("import pickle, sys; d = pickle.load(open(sys.argv[1], 'rb')); job = d.function; "
            "again = job.checkpoint(); print(job.run.run_dir.name, again.function is job, *job.run.extra_args)")
    proc = subprocess.run([sys.executable, "-c", show, str(pickles[0])], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    name, same, *flags = proc.stdout.split()
    assert name.startswith(("awac-", "iql-")) and same == "True" and flags == ["--device", "cuda"]
    with open(pickles[0], "rb") as f:
        assert pickle.load(f)._timeout_countdown == 7  # submitit's requeues at the time limit


def run_sweep(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "algorithms" / "sweep.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_local_sweep_end_to_end_then_resume_a_stopped_run(tmp_path, capsys):
    data = write_tiny_hdf5(tmp_path / "tiny-gymv5.hdf5")
    root, out = tmp_path / "runs", tmp_path / "report"
    grid = ["--algorithms", "awac", "iql", "--datasets", data, "--seeds", "0", "1", "--launcher", "local",
            "--workers", "2", "--checkpoints_path", root, "--out", out]
    path = sweep.main([*map(str, grid), "--", *TINY_RUN_FLAGS])
    printed = capsys.readouterr().out
    assert path == out / "report.md" and printed.strip().splitlines()[-1] == f"report: {path}"
    lines = printed.splitlines()
    assert sum(line.startswith("finished ") for line in lines) == 4 and "| tiny-gymv5 |" in lines[-2]  # the table
    row = table_rows(path.read_text())["tiny-gymv5"]
    assert [cell.split("(")[1] for cell in (row["awac"], row["iql"])] == ["2)", "2)"]  # 2 seeds each, finished
    assert len(list((root / ".submitit").glob("*_result.pkl"))) == 4  # submitit's local executor ran them
    stopped = root / "awac-tiny-gymv5-seed1"
    before = json.loads((stopped / "results.json").read_text())["evaluations"]
    assert [e["step"] for e in before] == [20, 40]

    # stopped after its step-40 checkpoint (config.yaml + checkpoint.pt, no results.json), an hour ago; the
    # second sweep trains for 60 steps: it skips the 3 finished runs and continues this one from step 40
    (stopped / "results.json").unlink()
    backdate(stopped, 3600)
    flags = [*TINY_RUN_FLAGS]
    flags[flags.index("--train_steps") + 1] = "60"
    proc = run_sweep(*grid, "--", *flags)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("skip ") and "(finished)" in line for line in lines) == 3
    assert any(line.startswith("resume   awac-tiny-gymv5-seed1") for line in lines)
    assert lines[-1] == f"report: {out / 'report.md'}"
    after = json.loads((stopped / "results.json").read_text())["evaluations"]
    assert [e["step"] for e in after] == [20, 40, 60] and after[:2] == before
    assert "Left out" not in (out / "report.md").read_text()

    assert sweep.main([*map(str, grid), "--dry_run"]) is None  # nothing left to do
    assert "4 jobs: 0 to run, 4 skipped" in capsys.readouterr().out


def test_failed_run_is_reported(tmp_path):
    proc = run_sweep("--algorithms", "iql", "--datasets", "nosuch-medium-gymv5", "--seeds", "0",
                     "--checkpoints_path", tmp_path / "runs", "--out", tmp_path / "report", "--", *TINY_RUN_FLAGS)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: 1 of 1 runs failed" in proc.stderr
    failed = [line for line in proc.stdout.splitlines() if line.startswith("failed   iql-nosuch-medium-gymv5-seed0")]
    assert len(failed) == 1 and "exit status 1: error:" in failed[0]  # the run's own one-line reason
