"""The d4rl branch of every algorithm's data block (the Docker image's path), driven through stub `gym` and
`d4rl` modules: gym.make(name).get_dataset() as the data, old-gym vector envs for evaluation, and
d4rl.get_normalized_score for the scores in results.json."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

EPISODE_LENGTH = 6  # every stub episode ends after this many steps
HOPPER_MIN, HOPPER_MAX = -20.272305, 3234.3  # D4RL's reference returns (PAPER_NOTES section 3)

STUB_D4RL = f'''
"""Stub of d4rl: registers nothing, scores with D4RL's reference returns."""
REF_MIN_SCORE = {{"hopper": {HOPPER_MIN}, "halfcheetah": -280.178953, "walker2d": 1.629008}}
REF_MAX_SCORE = {{"hopper": {HOPPER_MAX}, "halfcheetah": 12135.0, "walker2d": 4592.3}}


def get_normalized_score(env_name, score):
    key = env_name.split("-")[0]
    return (score - REF_MIN_SCORE[key]) / (REF_MAX_SCORE[key] - REF_MIN_SCORE[key])
'''

STUB_GYM = textwrap.dedent(f'''
    """Stub of gym 0.23 with a D4RL Hopper env: old step API, get_dataset(), and gym.vector.SyncVectorEnv."""
    import os
    import types

    import numpy as np

    OBS_DIM, ACT_DIM, EPISODE_LENGTH = 11, 3, {EPISODE_LENGTH}


    def _record(line):
        with open(os.environ["STUB_GYM_LOG"], "a") as f:
            f.write(line + "\\n")


    class Box:
        def __init__(self, low, high, shape):
            self.low, self.high, self.shape = np.full(shape, low, np.float32), np.full(shape, high, np.float32), shape


    class HopperStub:
        """Episodes of EPISODE_LENGTH steps; reward 1 + index (the env's place in its vector env) per step."""

        def __init__(self, name):
            self.name, self.index, self.t = name, 0, 0
            self.observation_space = Box(-np.inf, np.inf, (OBS_DIM,))
            self.action_space = Box(-1.0, 1.0, (ACT_DIM,))
            self.rng = np.random.default_rng(0)

        def seed(self, seed=None):
            self.rng = np.random.default_rng(seed)
            return [seed]

        def reset(self):
            self.t = 0
            return self.rng.normal(size=OBS_DIM)

        def step(self, action):
            action = np.asarray(action)
            assert action.shape == (ACT_DIM,) and np.isfinite(action).all(), action
            assert np.abs(action).max() <= 1.0, f"action outside the box: {{action}}"
            self.t += 1
            return self.rng.normal(size=OBS_DIM), 1.0 + self.index, self.t >= EPISODE_LENGTH, {{}}

        def get_dataset(self):
            _record(f"get_dataset {{self.name}}")
            rng, n, episode = np.random.default_rng(1), 3000, 300
            timeouts, terminals = np.zeros(n, bool), np.zeros(n, bool)
            timeouts[episode - 1::episode] = True
            terminals[episode // 2] = True
            return {{
                "observations": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
                "actions": rng.uniform(-0.95, 0.95, size=(n, ACT_DIM)).astype(np.float32),
                "rewards": rng.normal(1.0, 0.5, size=n).astype(np.float32),
                "next_observations": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
                "terminals": terminals, "timeouts": timeouts,
                "infos/qpos": np.zeros((n, 6), np.float32), "infos/qvel": np.zeros((n, 6), np.float32),
            }}


    def make(name):
        if not name.startswith("hopper-"):
            raise ValueError(f"stub gym knows only hopper-*-v2, not {{name}}")
        _record(f"make {{name}}")
        return HopperStub(name)


    class SyncVectorEnv:
        """gym 0.23: reset(seed=s) seeds env i with s + i and returns the stacked observations; step returns
        (obs, rewards, dones, infos) and resets a finished env by itself."""

        def __init__(self, env_fns):
            self.envs = [fn() for fn in env_fns]
            for i, env in enumerate(self.envs):
                env.index = i
            self.num_envs = len(self.envs)
            self.single_observation_space = self.envs[0].observation_space
            self.single_action_space = self.envs[0].action_space
            _record(f"vector {{self.num_envs}}")

        def reset(self, seed=None):
            for i, env in enumerate(self.envs):
                env.seed(None if seed is None else seed + i)
            return np.stack([env.reset() for env in self.envs])

        def step(self, actions):
            assert len(actions) == self.num_envs
            obs, rewards, dones, infos = [], [], [], []
            for env, action in zip(self.envs, actions):
                o, r, d, info = env.step(action)
                if d:
                    info = {{"terminal_observation": o}}
                    o = env.reset()
                obs.append(o), rewards.append(r), dones.append(d), infos.append(info)
            return np.stack(obs), np.array(rewards), np.array(dones), infos

        def close(self):
            _record("close")


    vector = types.SimpleNamespace(SyncVectorEnv=SyncVectorEnv)
''')

COMMON = ["--env", "hopper-medium-v2", "--device", "cpu", "--wandb_mode", "disabled", "--train_steps", "20",
          "--eval_every", "10", "--eval_episodes", "3", "--batch_size", "32", "--log_every", "10"]
FLOW = ["--flow_steps", "10", "--flow_eval_every", "5", "--flow_layers", "2", "--flow_hidden", "16",
        "--hidden_dim", "32", "--n_layers", "3"]
VAE = ["--vae_steps", "10", "--vae_save_every", "5", "--vae_hidden", "32"]
TINY_FLAGS = {
    "cnf": FLOW, "cnf_normal_ablation": FLOW, "cnf_latent_only": FLOW,
    "cnf_vae": VAE + ["--hidden_dim", "32", "--n_layers", "3"], "plas": VAE,
    "awac": ["--hidden_dim", "32", "--n_layers", "3"], "iql": ["--hidden_dim", "32", "--n_layers", "3"],
}


def has_d4rl_branch(name):
    path = ROOT / "algorithms" / f"{name}.py"
    return path.is_file() and "import d4rl" in path.read_text()


ALGORITHMS = [name for name in TINY_FLAGS if has_d4rl_branch(name)]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stubs")
    (directory / "gym.py").write_text(STUB_GYM)
    (directory / "d4rl.py").write_text(STUB_D4RL)
    return directory


def test_every_flow_and_baseline_script_is_covered():
    assert {"cnf", "cnf_normal_ablation", "cnf_latent_only"} <= set(ALGORITHMS)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_d4rl_path_loads_the_dataset_and_scores_with_d4rl(name, stubs, tmp_path):
    log = tmp_path / "gym_calls.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "STUB_GYM_LOG": str(log), "WANDB_SILENT": "true",
           "D4RL_DATASET_DIR": str(tmp_path / "no_d4rl_files")}  # nothing to fall back on: the d4rl branch or fail
    cmd = [sys.executable, str(ROOT / "algorithms" / f"{name}.py"), *COMMON, *TINY_FLAGS[name],
           "--checkpoints_path", str(tmp_path / "runs"), "--run_name", "run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert calls.count("get_dataset hopper-medium-v2") == 1  # the data came from gym.make(name).get_dataset()
    assert "vector 3" in calls  # evaluation in d4rl's env, through gym.vector.SyncVectorEnv

    results = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert results["dataset"] == "hopper-medium-v2"
    # Sub-env i earns 1 + i per step for EPISODE_LENGTH steps; the score is the mean of the three episodes'
    # d4rl-normalised returns, x 100.
    returns = [EPISODE_LENGTH * (1.0 + i) for i in range(3)]
    expected = 100.0 * sum((r - HOPPER_MIN) / (HOPPER_MAX - HOPPER_MIN) for r in returns) / 3
    assert [e["step"] for e in results["evaluations"]] == [10, 20]
    for evaluation in results["evaluations"]:
        assert evaluation["normalized_score"] == pytest.approx(expected, rel=1e-9)
    assert results["final_normalized_score"] == pytest.approx(expected, rel=1e-9)
