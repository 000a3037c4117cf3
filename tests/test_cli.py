"""The shared plumbing as a user meets it: every bad setting refused up front with one `error:` line,
config-file forms, Ctrl-C, kill and resume bookkeeping (wall time, metrics.jsonl, status.json).

These run the scripts in subprocesses, as a user would. Bad settings are refused before any data is
loaded, so those cases take a second each; cnf.py (the source of the plumbing) and iql.py (a baseline
with its own fields) cover the copies, which tests/test_copies.py keeps identical everywhere."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_algorithm, write_tiny_hdf5

TINY = ["--train_steps", "40", "--eval_every", "20", "--eval_episodes", "2", "--batch_size", "32"]
TINY_FLOW = ["--flow_steps", "20", "--flow_eval_every", "10", "--flow_layers", "2", "--flow_hidden", "16",
             "--hidden_dim", "32"]

BAD_SETTINGS = {  # flags -> a word the error line must name
    "batch_size 0": (["--batch_size", "0"], "batch_size"),
    "batch_size -5": (["--batch_size", "-5"], "batch_size"),
    "train_steps -3": (["--train_steps", "-3"], "train_steps"),
    "eval_every 0": (["--eval_every", "0"], "eval_every"),
    "log_every 0": (["--log_every", "0"], "log_every"),
    "eval_episodes 0": (["--eval_episodes", "0"], "eval_episodes"),
    "device tpu": (["--device", "tpu"], "device"),
    "unknown env": (["--env", "no-such-dataset-v9"], "--env"),
    "unbuildable bundled env": (["--env", "hopper-expert-gymv5"], "hopper-medium-gymv5"),
    "config_path without value": (["--config_path"], "config_path"),
    "missing config file": (["--config_path=/nonexistent.yaml"], "config_path"),
}
FLOW_BAD_SETTINGS = {
    "flow_steps -1": (["--flow_steps", "-1"], "flow_steps"),
    "flow_layers 0": (["--flow_layers", "0"], "flow_layers"),
    "flow_eval_every 0": (["--flow_eval_every", "0"], "flow_eval_every"),
    "flow_valid_fraction 1.0": (["--flow_valid_fraction", "1.0"], "flow_valid_fraction"),
}


def assert_one_error_line(result, word: str) -> None:
    assert result.returncode not in (0, 130), result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert word in errors[0], errors[0]


@pytest.mark.parametrize("algo, case", [("cnf", c) for c in {**BAD_SETTINGS, **FLOW_BAD_SETTINGS}]
                         + [("iql", c) for c in BAD_SETTINGS])
def test_bad_setting_is_one_error_line_before_anything_runs(tmp_path, algo, case):
    flags, word = {**BAD_SETTINGS, **FLOW_BAD_SETTINGS}[case]
    data = [] if "--env" in flags else ["--dataset_path", write_tiny_hdf5(tmp_path / "tiny.hdf5")]
    started = time.time()
    result = run_algorithm(algo, *data, "--checkpoints_path", str(tmp_path / "runs"), *flags, timeout=120)
    assert_one_error_line(result, word)
    assert not (tmp_path / "runs").exists(), "a refused setting must not create a run directory"
    assert time.time() - started < 60


@pytest.mark.parametrize("algo", ["cnf", "iql"])
def test_bad_yaml_is_one_error_line(tmp_path, algo):
    for text, word in [("train_stepz: 5\n", "train_stepz"), ("batch_size: [1, 2\n", "valid YAML"),
                       ("batch_size: many\n", "config_path")]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        assert_one_error_line(run_algorithm(algo, f"--config_path={path}", timeout=120), word)


def test_config_path_with_equals_is_read(tmp_path):
    """`--config_path=FILE` and `--config_path FILE` both apply the file (and the run's config.yaml says so)."""
    import cnf

    path = tmp_path / "c.yaml"
    path.write_text("awac_lambda: 0.25\ntrain_steps: 7\n")
    for argv in (["--config_path", str(path)], [f"--config_path={path}"]):
        config = cnf.parse_config(cnf.TrainConfig, argv)
        assert (config.awac_lambda, config.train_steps, config.config_path) == (0.25, 7, str(path))
    flags_win = cnf.parse_config(cnf.TrainConfig, [f"--config_path={path}", "--train_steps", "9"])
    assert flags_win.train_steps == 9


def test_one_row_dataset_is_refused(tmp_path):
    path = write_tiny_hdf5(tmp_path / "one.hdf5", n=1, episode=1)
    result = run_algorithm("cnf", "--dataset_path", path, "--checkpoints_path", str(tmp_path / "runs"), *TINY)
    assert_one_error_line(result, "transition")


def test_unknown_eval_env_is_one_error_line(tmp_path):
    path = write_tiny_hdf5(tmp_path / "tiny.hdf5", env="NoSuchEnv-v9")
    result = run_algorithm("iql", "--dataset_path", path, "--checkpoints_path", str(tmp_path / "runs"), *TINY)
    assert_one_error_line(result, "NoSuchEnv-v9")


@pytest.mark.parametrize("which", ["checkpoint.pt", "flow.pt"])
def test_truncated_checkpoint_on_resume_names_the_file(tmp_path, which):
    data = write_tiny_hdf5(tmp_path / "tiny.hdf5")
    runs = tmp_path / "runs"
    first = run_algorithm("cnf", "--dataset_path", data, "--checkpoints_path", str(runs), "--run_name", "r",
                          *TINY, *TINY_FLOW)
    assert first.returncode == 0, first.stderr
    results_before = (runs / "r" / "results.json").read_text()
    target = runs / "r" / which
    target.write_bytes(target.read_bytes()[:100])
    if which == "flow.pt":
        result = run_algorithm("cnf", "--dataset_path", data, "--checkpoints_path", str(tmp_path / "other"),
                               *TINY, *TINY_FLOW, "--flow_checkpoint", str(target))
    else:
        result = run_algorithm("cnf", "--resume", str(runs / "r"))
    assert_one_error_line(result, which)
    assert (runs / "r" / "results.json").read_text() == results_before  # nothing written is lost


def test_run_prints_scores_and_a_summary_without_noise(tmp_path):
    data = write_tiny_hdf5(tmp_path / "tiny.hdf5")
    result = run_algorithm("cnf", "--dataset_path", data, "--checkpoints_path", str(tmp_path / "runs"),
                           "--run_name", "r", *TINY, *TINY_FLOW)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    output = (result.stdout + result.stderr).splitlines()
    evaluations = [line for line in output if line.startswith("step ") and " normalized " in line]
    assert len(evaluations) == 2 and all("dataset average" in e for e in evaluations)
    assert lines[-1].startswith("results: ") and "last-10 mean" in lines[-2]
    assert "settotalmass" not in result.stderr and "wandb" not in result.stderr.lower()
    results = json.loads((tmp_path / "runs" / "r" / "results.json").read_text())
    assert results["dataset_normalized_score"] is not None
    assert json.loads((tmp_path / "runs" / "r" / "status.json").read_text())["state"] == "finished"


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    data = write_tiny_hdf5(tmp_path / "tiny.hdf5")
    run_dir = tmp_path / "runs" / "r"
    cmd = [sys.executable, str(ROOT / "algorithms" / "cnf.py"), "--device", "cpu", "--wandb_mode", "disabled",
           "--dataset_path", data, "--checkpoints_path", str(tmp_path / "runs"), "--run_name", "r",
           *TINY_FLOW, "--flow_steps", "100000", "--flow_eval_every", "20"]
    # SIGINT as a terminal delivers it: a process started in the background by a non-interactive shell (as CI
    # may start the suite) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (run_dir / "checkpoint.pt").exists(), "no checkpoint after 300 s"
    time.sleep(0.5)  # inside the training loop, past start-up
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 130, err
    assert "Traceback" not in err and f"--resume {run_dir}" in err and "step" in err
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    resumed = run_algorithm("cnf", "--resume", str(run_dir), "--flow_steps", "60", *TINY)
    assert resumed.returncode == 0, resumed.stderr


def test_resume_after_a_kill_counts_all_wall_time_and_logs_each_step_once(tmp_path):
    """A run killed (SIGKILL) mid-phase-2, then resumed: metrics.jsonl holds each (phase, step) once,
    wall_time_s counts the killed part up to its checkpoint too, and resuming the finished run changes nothing."""
    data = write_tiny_hdf5(tmp_path / "tiny.hdf5")
    run_dir = tmp_path / "runs" / "r"
    flags = ["--dataset_path", data, "--checkpoints_path", str(tmp_path / "runs"), "--run_name", "r",
             *TINY_FLOW, "--train_steps", "400000", "--eval_every", "20", "--log_every", "5", "--eval_episodes", "2",
             "--batch_size", "32"]
    cmd = [sys.executable, str(ROOT / "algorithms" / "cnf.py"), "--device", "cpu", "--wandb_mode", "disabled", *flags]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180

    def rl_step() -> int:
        try:
            checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
            return checkpoint["step"] if checkpoint["phase"] == "rl" else 0
        except Exception:  # not there yet, or being replaced
            return 0

    while rl_step() < 60 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # some logged steps past the checkpoint, which the resumed run logs again
    process.kill()
    process.wait()
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    killed_elapsed, end = saved["elapsed_s"], saved["step"] + 40
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"  # a kill leaves it so
    resumed = run_algorithm("cnf", "--resume", str(run_dir), "--train_steps", str(end))
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(row["phase"], row["step"], frozenset(row)) for row in rows]  # losses, scores, diagnostics: one line each
    assert len(keys) == len(set(keys)), "a step logged twice"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["wall_time_s"] > killed_elapsed > 0
    assert [e["step"] for e in results["evaluations"]] == list(range(20, end + 1, 20))
    again = run_algorithm("cnf", "--resume", str(run_dir), "--train_steps", str(end))
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "results.json").read_text())["evaluations"] == results["evaluations"]
