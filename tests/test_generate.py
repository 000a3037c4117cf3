"""data/generate.py: D4RL layout, attributes and determinism of generated datasets."""
import hashlib
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import cnf
from data import generate


def read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f.keys()}, dict(f.attrs)


@pytest.fixture
def policy_dir(tmp_path, monkeypatch):
    """A policy directory holding a (random) medium policy for Hopper-v5."""
    monkeypatch.setattr(generate, "POLICY_DIR", str(tmp_path / "policies"))
    (tmp_path / "policies").mkdir()
    torch.manual_seed(0)
    path = tmp_path / "policies" / "hopper-medium.pt"
    torch.save(generate.BehaviorPolicy(11, 3).state_dict(), path)
    return path


def test_generated_file_has_d4rl_layout_and_attributes(tmp_path, policy_dir):
    out = generate.generate("Hopper-v5", "medium", num_steps=600, seed=3, out=str(tmp_path / "d.hdf5"),
                            num_envs=4, progress=False)
    data, attrs = read(out)
    n = 600
    assert data["observations"].shape == (n, 11) and data["next_observations"].shape == (n, 11)
    assert data["actions"].shape == (n, 3) and data["rewards"].shape == (n,)
    assert data["terminals"].dtype == bool and data["timeouts"].dtype == bool
    assert np.abs(data["actions"]).max() <= 1.0
    assert data["timeouts"][-1] and not (data["terminals"] & data["timeouts"]).any()
    # Inside an episode the next row continues it: D4RL's layout, what qlearning_dataset relies on.
    inside = ~(data["terminals"] | data["timeouts"])[:-1]
    np.testing.assert_array_equal(data["next_observations"][:-1][inside], data["observations"][1:][inside])
    assert data["terminals"].any(), "a random Hopper policy falls: terminal rows expected"
    assert attrs["env"] == "Hopper-v5" and attrs["level"] == "medium" and attrs["seed"] == 3
    assert attrs["name"] == "hopper-medium-gymv5" and attrs["generator_version"] == generate.GENERATOR_VERSION
    assert attrs["policy_sha256"] == hashlib.sha256(policy_dir.read_bytes()).hexdigest()
    assert (attrs["ref_min_score"], attrs["ref_max_score"]) == generate.REFERENCE_SCORES["Hopper-v5"]
    # The q-learning conversion of the algorithm files reproduces the stored next observations.
    converted = cnf.qlearning_dataset(data)
    keep = np.flatnonzero(~data["timeouts"][:-1])
    np.testing.assert_array_equal(converted["next_observations"][~data["terminals"][keep]],
                                  data["next_observations"][keep][~data["terminals"][keep]])


def test_generation_is_deterministic_for_a_seed(tmp_path, policy_dir):
    runs = [read(generate.generate("Hopper-v5", level, num_steps=300, seed=seed, out=str(tmp_path / f"{i}.hdf5"),
                                   num_envs=3, progress=False))[0]
            for i, (level, seed) in enumerate([("medium", 1), ("medium", 1), ("medium", 2), ("random", 1)])]
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key])
    assert not np.array_equal(runs[0]["actions"], runs[2]["actions"])
    assert not np.array_equal(runs[0]["actions"], runs[3]["actions"])


def test_missing_policy_level_is_a_clear_error(tmp_path, policy_dir):
    with pytest.raises(SystemExit, match="not available"):
        generate.generate("Hopper-v5", "expert", num_steps=10, seed=0, out=str(tmp_path / "x.hdf5"), progress=False)
    with pytest.raises(SystemExit, match="unknown --env"):
        generate.generate("Ant-v5", "random", num_steps=10, seed=0, out=str(tmp_path / "x.hdf5"), progress=False)


def test_medium_expert_concatenates_both_policies(tmp_path, policy_dir):
    torch.save(generate.BehaviorPolicy(11, 3).state_dict(), policy_dir.with_name("hopper-expert.pt"))
    data, attrs = read(generate.generate("Hopper-v5", "medium-expert", num_steps=200, seed=0,
                                         out=str(tmp_path / "me.hdf5"), num_envs=2, progress=False))
    assert len(data["rewards"]) == 400 and len(attrs["policy_sha256"].split(",")) == 2
    assert data["timeouts"][199] or data["terminals"][199]  # the medium half ends an episode


# The bands around D4RL's medium scores (Walker2d: the same band as Hopper).
MEDIUM_BAND = {"HalfCheetah-v5": 8.0, "Hopper-v5": 10.0, "Walker2d-v5": 10.0}
SHIPPED_MEDIUM = [env for env in generate.REFERENCE_SCORES
                  if os.path.exists(generate.policy_path(env, "medium"))]


@pytest.mark.parametrize("env_id", SHIPPED_MEDIUM)
def test_shipped_medium_policy_scores_like_d4rl_medium(env_id):
    """Each shipped medium policy, rolled out stochastically for 10 whole episodes, scores near
    D4RL's medium dataset and within 15% of the return its training log recorded when it was kept
    (the confirmation's, where the snapshot was confirmed)."""
    from data.train_behavior import MEDIUM_TARGETS, evaluate

    path = generate.policy_path(env_id, "medium")
    returns = evaluate(env_id, torch.load(path, weights_only=True), episodes=10, seed=0)
    score = float(generate.normalized_score(env_id, returns.mean()))
    assert abs(score - MEDIUM_TARGETS[env_id]) <= MEDIUM_BAND[env_id], (env_id, score)
    with open(path.replace("-medium.pt", "-training.json")) as f:
        medium = json.load(f)["kept"]["medium"]
    kept = medium.get("confirmed_return_mean", medium["return_mean"])
    assert abs(returns.mean() - kept) <= 0.15 * abs(kept), (env_id, returns.mean(), kept)


def test_train_behavior_evaluate_cli_prints_returns_and_refuses_bad_policies(tmp_path):
    """`train_behavior.py --evaluate` (the command behind data/README.md's returns) needs no SB3."""
    torch.manual_seed(0)
    policy = tmp_path / "p.pt"
    torch.save(generate.BehaviorPolicy(11, 3).state_dict(), policy)
    script = os.path.join(os.path.dirname(generate.__file__), "train_behavior.py")
    ok = subprocess.run([sys.executable, script, "--env", "Hopper-v5", "--evaluate", str(policy),
                         "--eval_episodes", "3"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"return -?[\d.]+ \+- [\d.]+ over 3 episodes, normalised -?[\d.]+", ok.stdout), ok.stdout
    missing = subprocess.run([sys.executable, script, "--env", "Hopper-v5", "--evaluate", str(tmp_path / "no.pt")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines() == [
        f"error: no policy file {tmp_path / 'no.pt'}; see data/policies/ for the shipped ones"]
    wrong_env = subprocess.run([sys.executable, script, "--env", "HalfCheetah-v5", "--evaluate", str(policy)],
                               capture_output=True, text=True, timeout=300)
    assert wrong_env.returncode != 0 and wrong_env.stderr.strip().splitlines()[-1].startswith(
        "error: the policy's shapes do not fit HalfCheetah-v5")


def test_medium_choice_trusts_the_confirmed_score_over_a_lucky_short_evaluation():
    from data.train_behavior import closest_to

    lucky = {"step": 170_000, "normalized": 61.6, "confirmed_normalized": 41.0}  # 5 episodes hit, 20 did not
    steady = {"step": 200_000, "normalized": 66.8, "confirmed_normalized": 65.0}
    unconfirmed = {"step": 100_000, "normalized": 50.0}
    assert closest_to([lucky, steady, unconfirmed], target=62.1) is steady
    assert closest_to([lucky, unconfirmed], target=62.1) is unconfirmed
