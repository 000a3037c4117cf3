"""The shared plumbing's evaluation workers and polite stops (cnf.py, the plumbing's source; tests/test_copies.py
keeps every file's copy identical): evaluations in background processes give exactly the in-process scores and
resume when pending; SIGTERM mid-phase-2 is a checkpoint of that step, status "interrupted", exit 143 and an exact
resume; a dead worker is one error line; run names and progress output suit files, pipes and Minari ids."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cnf
from conftest import ROOT, run_algorithm

TINY = ["--eval_episodes", "2", "--batch_size", "32", "--flow_steps", "20", "--flow_eval_every", "10",
        "--flow_layers", "2", "--flow_hidden", "16", "--hidden_dim", "32"]


def scores(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    return [(e["step"], e["normalized_score"]) for e in results["evaluations"]]


def test_a_worker_evaluates_exactly_what_the_training_process_would(tmp_path, tiny_hdf5):
    """Same seed on a CPU: the same scores with 0 or 1 workers, logged once each, at their own steps, in order."""
    for workers in (0, 1):
        proc = run_algorithm("cnf", "--dataset_path", tiny_hdf5, *TINY, "--train_steps", "60", "--eval_every", "10",
                             "--eval_workers", str(workers), "--checkpoints_path", str(tmp_path),
                             "--run_name", f"w{workers}", timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert scores(tmp_path / "w0") == scores(tmp_path / "w1") and len(scores(tmp_path / "w1")) == 6
    rows = [json.loads(line) for line in (tmp_path / "w1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/normalized_score" in r] == [10, 20, 30, 40, 50, 60]


def test_sigterm_mid_phase_2_checkpoints_that_step_and_resumes_exactly(tmp_path, tiny_hdf5):
    """`kill PID` during phase 2 (an evaluation still pending in its worker): exit 143, status "interrupted", a
    checkpoint of the last step done (not the last evaluation's) that records the pending evaluation; --resume
    then ends with the uninterrupted run's scores and metrics, each line once."""
    flags = ["--dataset_path", tiny_hdf5, *TINY, "--train_steps", "4000", "--eval_every", "1000",
             "--checkpoints_path", str(tmp_path)]
    assert run_algorithm("cnf", *flags, "--run_name", "full", timeout=600).returncode == 0
    command = [sys.executable, str(ROOT / "algorithms" / "cnf.py"), "--device", "cpu", "--cpu_threads", "1",
               "--wandb_mode", "disabled", *flags, "--run_name", "stopped", "--eval_workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "stopped" / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and '"eval/normalized_score"' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.05)  # the first evaluation is logged: phase 2 is under way
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert f"--resume {tmp_path / 'stopped'}" in stderr and "Traceback" not in stderr
    assert json.loads((tmp_path / "stopped" / "status.json").read_text())["state"] == "interrupted"
    checkpoint = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert checkpoint["phase"] == "rl" and 1000 < checkpoint["step"] < 4000
    proc = run_algorithm("cnf", "--resume", str(tmp_path / "stopped"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert scores(tmp_path / "stopped") == scores(tmp_path / "full")
    keys = [(r["phase"], r["step"], tuple(sorted(r))) for r in map(json.loads, metrics.read_text().splitlines())]
    assert len(keys) == len(set(keys))


def dying_env(num_envs: int):
    os._exit(3)  # the worker process dies as a crashed MuJoCo would take it down


def test_a_dead_worker_is_one_error_line_not_a_hang(tmp_path):
    config = cnf.TrainConfig(eval_workers=1, eval_episodes=2, device="cpu")
    data = cnf.OfflineData("tiny", *[np.zeros((2, 1), np.float32)] * 2, np.zeros(2, np.float32),
                           np.zeros((2, 1), np.float32), np.zeros(2, np.float32), functools.partial(dying_env),
                           lambda returns: returns)
    run = cnf.Run(config, data, tmp_path, None, None, time.time())
    run.normalizer, run.step = (np.zeros(1), np.ones(1)), 7
    run.submit(7, cnf.policy_snapshot(_Policy().act))
    with pytest.raises(SystemExit, match=r"^error: an evaluation worker died .* stopped at step 7 .* --resume"):
        run.collect([], keep=0)
    run.close()


def test_default_run_names_are_one_flat_folder_and_progress_suits_a_file(tmp_path, monkeypatch, capsys):
    """A Minari id's slashes do not nest the run directory; with stderr not a terminal the progress is a plain
    line at most every 30 s (no carriage returns)."""
    data = cnf.OfflineData("mujoco/hopper/medium-v0", *[np.zeros((2, 11), np.float32)] * 2,
                           np.zeros(2, np.float32), np.zeros((2, 11), np.float32), np.zeros(2, np.float32),
                           lambda n: _Probe(), np.asarray)
    data.actions = np.zeros((2, 3), np.float32)
    run = cnf.start_run(cnf.TrainConfig(checkpoints_path=str(tmp_path), wandb_mode="disabled", device="cpu"), data)
    assert run.dir.parent == tmp_path and run.dir.name.startswith("cnf-mujoco_hopper_medium-v0-seed0-")
    clock = iter(range(0, 10_000, 7))  # every step takes 7 s
    monkeypatch.setattr(cnf, "time", type("Clock", (), {"time": staticmethod(lambda: float(next(clock)))}))
    assert list(run.steps(0, 20, "phase 2: RL")) == list(range(1, 21))
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines) and lines and all(line.startswith("phase 2: RL: step ") for line in lines)
    assert 3 <= len(lines) <= 5  # 20 steps x 7 s = 140 s: a line every 30 s
    run.logger.close()


class _Policy:
    def act(self, states):
        return states


class _Probe:
    """An evaluation env with the data's shapes, for start_run's check."""
    single_observation_space = type("Space", (), {"shape": (11,)})
    single_action_space = type("Space", (), {"shape": (3,)})

    def close(self):
        pass
