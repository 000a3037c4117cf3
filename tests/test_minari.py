"""Minari datasets as a data source of every algorithm file (the plumbing's source 5).

The dataset is written by the test itself into a temporary MINARI_DATASETS_PATH with Minari's own
`create_dataset_from_buffers` (its `DataCollector` needs `minari[create]`, i.e. JAX, which the project
does not install): a few random-policy Hopper-v5 episodes, some ended by termination, the rest by a
50-step time limit."""
import os

import numpy as np
import pytest

from conftest import ROOT, run_algorithm

minari = pytest.importorskip("minari")
DATASET_ID = "mujoco/hoppertest/random-v0"
ALGORITHM_FILES = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py")
                         if "class TrainConfig" in p.read_text() and "def load_offline_data" in p.read_text())
TINY = {"train_steps": "20", "eval_every": "10", "eval_episodes": "2", "batch_size": "16"}
TINY_PHASE_1 = {"flow_steps": "10", "flow_eval_every": "5", "flow_layers": "2", "flow_hidden": "8",
                "vae_steps": "10", "vae_hidden": "16", "hidden_dim": "16"}
TINY_OWN = {"sfbc": ["--score_widths", "32", "16", "--critic_hidden", "32", "--critic_steps", "10",
                     "--planning_candidates", "4", "--eval_candidates", "4", "--solver_steps", "3"]}


@pytest.fixture(scope="module")
def minari_store(tmp_path_factory):
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    store = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    env = gym.make("Hopper-v5", max_episode_steps=50)
    env.action_space.seed(0)
    episodes = []
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while not (terminations and (terminations[-1] or truncations[-1])):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
        episodes.append(EpisodeBuffer(id=seed, observations=np.array(observations), actions=np.array(actions),
                                      rewards=np.array(rewards), terminations=np.array(terminations),
                                      truncations=np.array(truncations), infos={}))
    minari.create_dataset_from_buffers(DATASET_ID, episodes, env=env, algorithm_name="random",
                                       eval_env="Hopper-v5", ref_min_score=-20.272305, ref_max_score=3234.3)
    yield store, episodes
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH")
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


def test_transitions_are_what_the_episodes_say(minari_store):
    import cnf

    _, episodes = minari_store
    data = cnf.load_offline_data(cnf.TrainConfig(env=DATASET_ID))
    assert any(e.terminations[-1] for e in episodes) and any(e.truncations[-1] for e in episodes)
    # D4RL's conversion: every step but a time-limit end becomes a transition to the next observation;
    # a terminated step keeps done = 1. The data's last step has no next row and is dropped.
    expected = []
    for i, e in enumerate(episodes):
        for t in range(len(e.actions)):
            last_of_data = i == len(episodes) - 1 and t == len(e.actions) - 1
            if (e.truncations[t] and not e.terminations[t]) or last_of_data:
                continue
            expected.append((e.observations[t], e.actions[t], e.rewards[t], e.observations[t + 1]
                             if t + 1 < len(e.actions) else episodes[i + 1].observations[0], float(e.terminations[t])))
    assert len(data.rewards) == len(expected)
    for key, column in [("observations", 0), ("actions", 1), ("rewards", 2), ("dones", 4)]:
        np.testing.assert_allclose(getattr(data, key), np.array([row[column] for row in expected]), rtol=1e-6)
    terminal_rows = data.dones == 1
    np.testing.assert_allclose(data.next_observations[~terminal_rows],
                               np.array([row[3] for row in expected])[~terminal_rows], rtol=1e-6)
    returns = [float(np.sum(e.rewards)) for e in episodes]
    assert data.dataset_score == pytest.approx(np.mean(100 * (np.array(returns) + 20.272305) / (3234.3 + 20.272305)))


def test_a_missing_dataset_names_the_download_command(minari_store, tmp_path):
    result = run_algorithm("cnf", "--env", "mujoco/nothere/medium-v0", "--checkpoints_path", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "minari download mujoco/nothere/medium-v0" in result.stderr


@pytest.mark.parametrize("algo", ALGORITHM_FILES)
def test_every_algorithm_file_runs_on_a_minari_dataset(minari_store, tmp_path, algo):
    import json

    fields = (ROOT / "algorithms" / f"{algo}.py").read_text()
    flags = [f"--{k}={v}" for k, v in {**TINY, **TINY_PHASE_1}.items() if f"\n    {k}:" in fields]
    flags += TINY_OWN.get(algo, [])
    result = run_algorithm(algo, "--env", DATASET_ID, "--checkpoints_path", str(tmp_path), "--run_name", "r", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["dataset"] == DATASET_ID and results["final_normalized_score"] is not None
    assert results["score"].startswith("normalized")
