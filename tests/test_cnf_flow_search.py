"""algorithms/cnf_flow_search.py: Table 3's random search over cnf.py's phase 1."""
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location("cnf_flow_search_under_test", ROOT / "algorithms" / "cnf_flow_search.py")
search_module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = search_module
spec.loader.exec_module(search_module)
SearchConfig, Trial = search_module.SearchConfig, search_module.Trial


def test_trials_are_a_function_of_the_seed_and_follow_the_search_space():
    config = SearchConfig(seed=3)
    trials = search_module.draw_trials(config, 2000)
    assert trials == search_module.draw_trials(config, 2000)
    assert trials[:5] == search_module.draw_trials(config, 5)  # more trials only append
    assert trials[:5] != search_module.draw_trials(replace(config, seed=4), 5)
    lrs = np.array([t.lr for t in trials])
    assert lrs.min() >= 1e-5 and lrs.max() <= 3e-3
    # log-uniform: half the draws below the geometric midpoint sqrt(1e-5 * 3e-3) = 1.7e-4 (uniform: 5%)
    assert 0.45 < np.mean(lrs < math.sqrt(1e-5 * 3e-3)) < 0.55
    uniform = np.array([t.lr for t in search_module.draw_trials(replace(config, lr_sampling="uniform"), 2000)])
    assert np.mean(uniform < math.sqrt(1e-5 * 3e-3)) < 0.1
    decays = np.array([t.weight_decay for t in trials])
    assert decays.min() >= 0 and decays.max() <= 1e-2 and 0.45 < np.mean(decays < 5e-3) < 0.55
    assert {t.batch_size for t in trials} == {512, 1024, 2048}
    assert len({t.seed for t in trials}) == len(trials)


def tiny_search(tiny_hdf5, tmp_path, **overrides):
    fields = dict(dataset_path=tiny_hdf5, device="cpu", trials=3, flow_steps=20, flow_eval_every=5, flow_layers=2,
                  flow_hidden=16, checkpoints_path=str(tmp_path), run_name="search")
    fields.update(overrides)
    return SearchConfig(**fields)


SCRIPTED = [Trial(0, 1e-5, 0.0, 512, 11), Trial(1, 3e-3, 1e-3, 1024, 12), Trial(2, 2e-5, 5e-3, 512, 13)]


def test_the_winner_has_the_lowest_validation_nll_and_loads_with_flow_checkpoint(tmp_path, tiny_hdf5, monkeypatch):
    # Scripted draws, so that the best trial (highest learning rate) is not the last one.
    monkeypatch.setattr(search_module, "draw_trials", lambda config, n: SCRIPTED[:n])
    out = tmp_path / "flows" / "best.pt"
    config = tiny_search(tiny_hdf5, tmp_path, out=str(out), keep_trial_flows=True)
    summary = json.loads(search_module.search(config).read_text())
    rows = summary["trials"]
    assert [(r["trial"], r["lr"], r["batch_size"]) for r in rows] == [(t.index, t.lr, t.batch_size) for t in SCRIPTED]
    for row in rows:  # a trial's score is the best of its validation NLLs, as its flow.pt says
        curve = [json.loads(line)["flow/valid_nll"] for line in
                 (tmp_path / "search" / f"trial_{row['trial']:03d}" / "metrics.jsonl").read_text().splitlines()]
        assert len(curve) == 4 and row["best_valid_nll"] == pytest.approx(min(curve), abs=1e-9)
    winner = min(rows, key=lambda r: r["best_valid_nll"])
    assert summary["best"]["trial"] == winner["trial"] == 1
    assert len({r["best_valid_nll"] for r in rows}) == 3
    saved, trial_flow = torch.load(out, weights_only=True), torch.load(winner["flow"], weights_only=True)
    assert saved["best_valid_nll"] == winner["best_valid_nll"]
    assert all(torch.equal(saved["flow"][k], trial_flow["flow"][k]) for k in trial_flow["flow"])
    csv_rows = (tmp_path / "search" / "trials.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("trial,lr,weight_decay,batch_size")

    cmd = [sys.executable, str(ROOT / "algorithms" / "cnf.py"), "--dataset_path", tiny_hdf5, "--device", "cpu",
           "--wandb_mode", "disabled", "--checkpoints_path", str(tmp_path), "--run_name", "rl",
           "--flow_checkpoint", str(out), "--train_steps", "10", "--eval_every", "10", "--eval_episodes", "2",
           "--batch_size", "32", "--hidden_dim", "32", "--n_layers", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "flow/valid_nll" not in (tmp_path / "rl" / "metrics.jsonl").read_text()  # phase 1 skipped
    assert not (tmp_path / "rl" / "flow.pt").exists()


def test_same_seed_same_search_and_only_the_best_flow_is_kept(tmp_path, tiny_hdf5):
    first = json.loads(search_module.search(tiny_search(tiny_hdf5, tmp_path / "a")).read_text())
    second = json.loads(search_module.search(tiny_search(tiny_hdf5, tmp_path / "b")).read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_time_s", "flow")} for r in rows]  # noqa: E731
    assert strip(first["trials"]) == strip(second["trials"])
    kept = sorted(p.parent.name for p in (tmp_path / "a" / "search").glob("trial_*/flow.pt"))
    assert kept == [f"trial_{first['best']['trial']:03d}"]
    assert (tmp_path / "a" / "search" / "best_flow.pt").exists()  # --out's default


def test_resume_after_a_stop_matches_an_uninterrupted_search(tmp_path, tiny_hdf5, monkeypatch):
    full = json.loads(search_module.search(tiny_search(tiny_hdf5, tmp_path, run_name="full")).read_text())
    cnf = search_module.FLOW_SCRIPTS["cnf"]
    calls, original = {"n": 0}, cnf.FlowPretrainer.train

    def stop_in_the_second_trial(self, actions, states):
        calls["n"] += 1
        if calls["n"] > 32:  # trial 2, step 13: after its checkpoint at step 10
            raise KeyboardInterrupt
        return original(self, actions, states)

    monkeypatch.setattr(cnf.FlowPretrainer, "train", stop_in_the_second_trial)
    with pytest.raises(KeyboardInterrupt):
        search_module.search(tiny_search(tiny_hdf5, tmp_path, run_name="stopped"))
    stopped = tmp_path / "stopped"
    assert len(json.loads((stopped / "trials.json").read_text())["trials"]) == 1
    assert torch.load(stopped / "trial_001" / "checkpoint.pt", weights_only=True)["step"] == 10
    monkeypatch.setattr(cnf.FlowPretrainer, "train", original)
    resumed = json.loads(search_module.search(
        search_module.parse_search_config(["--resume", str(stopped)])).read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_time_s", "flow")} for r in rows]  # noqa: E731
    assert strip(resumed["trials"]) == strip(full["trials"])
    assert not list(stopped.glob("trial_*/checkpoint.pt"))


def test_yaml_gives_env_and_flow_sizes_and_flags_override(tmp_path):
    path = ROOT / "algorithms" / "configs" / "cnf" / "hopper-medium-replay-v2.yaml"
    config = search_module.parse_search_config(["--config_path", str(path), "--flow_steps", "7"])
    assert (config.env, config.flow_layers, config.flow_hidden, config.flow_steps) == \
        ("hopper-medium-replay-v2", 4, 64, 7)
    assert config.trials is None  # the paper's count for the dataset (50 locomotion, 20 maze2d)


@pytest.mark.parametrize("flags, words", [(["--lr_min", "0"], ["lr_min"]),
                                          (["--lr_min", "1e-2", "--lr_max", "1e-3"], ["lr_min <= lr_max"]),
                                          (["--weight_decay_min", "-1"], ["weight_decay_min"]),
                                          (["--flow_script", "nope"], ["--flow_script", "nope"]),
                                          (["--lr_sampling", "nope"], ["--lr_sampling", "nope"]),
                                          (["--trials", "0"], ["--trials"])])
def test_bad_setting_is_one_error_line_that_names_it(tmp_path, flags, words):
    proc = subprocess.run([sys.executable, str(ROOT / "algorithms" / "cnf_flow_search.py"), *flags,
                           "--checkpoints_path", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert all(word in errors[0] for word in words), (words, errors[0])
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_flow_script_picks_whose_phase_1_runs(tmp_path, tiny_hdf5):
    out = tmp_path / "normal.pt"
    search_module.search(tiny_search(tiny_hdf5, tmp_path, trials=1, flow_script="cnf_normal_ablation", out=str(out)))
    assert torch.load(out, weights_only=True)["base_distribution"] == "normal"  # cnf_normal_ablation.py's flow
