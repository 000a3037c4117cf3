"""Roll out a shipped behaviour policy into a D4RL-format HDF5 dataset (Gymnasium MuJoCo, no mujoco-py).

    python data/generate.py --env HalfCheetah-v5 --level medium --num_steps 1000000 --seed 0 \
        --out ~/.cache/cnf/datasets/halfcheetah-medium-gymv5.hdf5

Levels (the policies in data/policies/ decide which exist for an environment):
- random: uniform random actions in [-1, 1]^n (D4RL used a randomly initialised policy; a uniform
  action is the policy-free equivalent).
- medium / expert: the shipped SAC actor, *stochastic* actions, as D4RL collected them.
- medium-expert: `num_steps` of medium followed by `num_steps` of expert (D4RL: 1M + 1M).
- medium-replay: the SAC replay buffer up to the medium snapshot, shipped as a file by
  data/train_behavior.py; `num_steps` is ignored (the buffer is what it is).

Episodes are stepped in a vector of `--num_envs` environments and written one after another, so
`observations[i + 1]` continues episode i unless `terminals[i]` or `timeouts[i]` is set (D4RL's
layout). The last, cut-off episode of every environment ends with `timeouts = True`. The output is
a deterministic function of (policy file, level, num_steps, seed, num_envs).

Names: generated datasets are `<env>-<level>-gymv5` (e.g. `halfcheetah-medium-gymv5`): the
`-gymv5` suffix says that these are new collections in Gymnasium's v5 environments, not D4RL files.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

GENERATOR_VERSION = "1"
POLICY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies")
LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
MAX_EPISODE_STEPS = 1000  # Gymnasium's time limit for HalfCheetah, Hopper and Walker2d v5
# Copied from cnf.py: D4RL_REF_SCORES
D4RL_REF_SCORES = {  # D4RL's (random, expert) returns: normalised score = 100 (R - min) / (max - min)
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3),
    "maze2d-umaze": (23.85, 161.86), "maze2d-medium": (13.13, 277.39), "maze2d-large": (6.7, 273.99),
}
# Copied from cnf.py: GYMNASIUM_IDS
GYMNASIUM_IDS = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
# D4RL's reference returns (min = random policy, max = expert), used for normalised scores.
REFERENCE_SCORES = {f"{name}-v5": D4RL_REF_SCORES[key] for key, name in GYMNASIUM_IDS.items()}


def normalized_score(env_id: str, episode_return):
    low, high = REFERENCE_SCORES[env_id]
    return 100.0 * (np.asarray(episode_return) - low) / (high - low)


def dataset_name(env_id: str, level: str) -> str:
    """'HalfCheetah-v5', 'medium' -> 'halfcheetah-medium-gymv5'."""
    return f"{env_id.split('-')[0].lower()}-{level}-gymv5"


class BehaviorPolicy(nn.Module):
    """The SAC actor D4RL's data came from: 2 x 256 ReLU trunk, Gaussian head, tanh squashing."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h = self.trunk(obs)
        std = self.log_std(h).clamp(-20.0, 2.0).exp()  # SB3's and rlkit's clamp
        mean = self.mean(h)
        return torch.tanh(mean + std * torch.randn(mean.shape, generator=generator))


def policy_path(env_id: str, level: str) -> str:
    return os.path.join(POLICY_DIR, f"{env_id.split('-')[0].lower()}-{level}.pt")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_d4rl_hdf5(path: str, observations, actions, rewards, terminals, timeouts, attrs: dict,
                    next_observations=None) -> None:
    """Write D4RL's layout atomically (temp file, then rename): a killed run leaves no half file."""
    import h5py

    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(tmp, "w") as f:
        f["observations"] = np.asarray(observations, dtype=np.float32)
        f["actions"] = np.asarray(actions, dtype=np.float32)
        f["rewards"] = np.asarray(rewards, dtype=np.float32)
        f["terminals"] = np.asarray(terminals, dtype=bool)
        f["timeouts"] = np.asarray(timeouts, dtype=bool)
        if next_observations is not None:
            f["next_observations"] = np.asarray(next_observations, dtype=np.float32)
        for key, value in attrs.items():
            f.attrs[key] = value
    os.replace(tmp, path)


def rollout(env_id: str, policy, num_steps: int, seed: int, num_envs: int, progress: bool = True) -> dict:
    """Step `num_envs` environments until `num_steps` transitions; return D4RL-layout arrays.

    `policy` is a BehaviorPolicy or None (uniform random actions).
    """
    import gymnasium as gym
    from tqdm import tqdm

    steps_per_env = -(-num_steps // num_envs)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    shape = (steps_per_env, num_envs)
    buf = {
        "observations": np.empty(shape + (obs_dim,), np.float32),
        "next_observations": np.empty(shape + (obs_dim,), np.float32),
        "actions": np.empty(shape + (act_dim,), np.float32),
        "rewards": np.empty(shape, np.float32),
        "terminals": np.empty(shape, bool),
        "timeouts": np.empty(shape, bool),
    }
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    for t in tqdm(range(steps_per_env), desc=f"generate {env_id}", disable=not progress, mininterval=2):
        if policy is None:
            action = rng.uniform(-1.0, 1.0, size=(num_envs, act_dim)).astype(np.float32)
        else:
            with torch.no_grad():
                action = policy.sample(torch.as_tensor(obs, dtype=torch.float32), generator).numpy()
        next_obs, reward, terminated, truncated, info = envs.step(action)
        done = terminated | truncated
        real_next = next_obs.copy()
        if done.any():  # SAME_STEP autoreset: next_obs is already the reset state
            real_next[done] = np.stack(info["final_obs"][done])
        buf["observations"][t], buf["next_observations"][t] = obs, real_next
        buf["actions"][t], buf["rewards"][t] = action, reward
        buf["terminals"][t], buf["timeouts"][t] = terminated, truncated & ~terminated
        obs = next_obs
    envs.close()
    buf["timeouts"][-1] |= ~buf["terminals"][-1]  # each environment's last episode is cut off here
    # [steps, envs, ...] -> environment after environment, each a run of whole episodes.
    data = {k: np.swapaxes(v, 0, 1).reshape((-1,) + v.shape[2:])[:num_steps] for k, v in buf.items()}
    data["timeouts"][-1] |= ~data["terminals"][-1]
    return data


def load_policy(env_id: str, level: str):
    import gymnasium as gym

    path = policy_path(env_id, level)
    if not os.path.exists(path):
        raise SystemExit(f"error: no shipped {level} policy for {env_id} ({path}); "
                         f"levels with policies: {available_levels(env_id)}")
    env = gym.make(env_id)
    policy = BehaviorPolicy(env.observation_space.shape[0], env.action_space.shape[0])
    policy.load_state_dict(torch.load(path, weights_only=True))
    env.close()
    return policy, path


def available_levels(env_id: str) -> list:
    levels = ["random"]
    for level in ("medium", "medium-replay", "expert"):
        suffix = ".hdf5" if level == "medium-replay" else ".pt"
        if os.path.exists(policy_path(env_id, level)[: -len(".pt")] + suffix):
            levels.append(level)
    if "medium" in levels and "expert" in levels:
        levels.append("medium-expert")
    return levels


def generate(env_id: str, level: str, num_steps: int, seed: int, out: str, num_envs: int = 10,
             progress: bool = True) -> str:
    """Write the dataset to `out` and return its path."""
    import h5py

    if env_id not in REFERENCE_SCORES:
        raise SystemExit(f"error: unknown --env {env_id!r}; choose one of {sorted(REFERENCE_SCORES)}")
    if level not in available_levels(env_id):
        raise SystemExit(f"error: level {level!r} is not available for {env_id}; "
                         f"available: {available_levels(env_id)}")
    torch.set_num_threads(1)
    attrs = {"env": env_id, "level": level, "name": dataset_name(env_id, level), "seed": seed,
             "generator_version": GENERATOR_VERSION, "num_envs": num_envs,
             "ref_min_score": REFERENCE_SCORES[env_id][0], "ref_max_score": REFERENCE_SCORES[env_id][1]}
    if level == "medium-replay":
        source = policy_path(env_id, level)[: -len(".pt")] + ".hdf5"
        with h5py.File(source, "r") as f:
            data = {k: f[k][:] for k in f.keys()}
        attrs["policy_sha256"] = file_sha256(source)
    else:
        parts = {"random": [None], "medium": ["medium"], "expert": ["expert"],
                 "medium-expert": ["medium", "expert"]}[level]
        chunks, hashes = [], []
        for i, part in enumerate(parts):
            policy = None
            if part is not None:
                policy, path = load_policy(env_id, part)
                hashes.append(file_sha256(path))
            chunks.append(rollout(env_id, policy, num_steps, seed + i, num_envs, progress))
        data = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        attrs["policy_sha256"] = ",".join(hashes) if hashes else "none (uniform random actions)"
    write_d4rl_hdf5(out, attrs=attrs, **data)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Roll out a shipped policy into a D4RL-format HDF5 file.")
    parser.add_argument("--env", default="HalfCheetah-v5", help=f"one of {sorted(REFERENCE_SCORES)}")
    parser.add_argument("--level", default="medium", choices=LEVELS)
    parser.add_argument("--num_steps", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_envs", type=int, default=10)
    parser.add_argument("--out", default=None, help="default: ./<env>-<level>-gymv5.hdf5")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args()
    if args.num_steps < 1 or args.num_envs < 1:
        parser.error("--num_steps and --num_envs must be at least 1")
    out = args.out or f"{dataset_name(args.env, args.level)}.hdf5"
    start = time.time()
    generate(args.env, args.level, args.num_steps, args.seed, out, args.num_envs, not args.no_progress)
    import h5py

    with h5py.File(out, "r") as f:
        n, rewards = len(f["rewards"]), f["rewards"][:]
        terminals = f["terminals"][:]
        ends = np.flatnonzero(terminals | f["timeouts"][:])
    starts = np.concatenate([[0], ends[:-1] + 1])
    # Whole episodes only: each environment's last episode is cut by --num_steps, not by the time limit.
    whole = terminals[ends] | (ends - starts + 1 == MAX_EPISODE_STEPS)
    returns = np.add.reduceat(rewards, starts)[whole] if len(ends) else np.zeros(0)
    summary = (f"return {returns.mean():.1f} +- {returns.std():.1f}, normalised "
               f"{normalized_score(args.env, returns.mean()):.1f}" if len(returns)
               else "no whole episode yet, so no return to report (raise --num_steps)")
    print(f"wrote {out}: {n} transitions in {time.time() - start:.1f} s, {len(returns)} whole episodes "
          f"(of {len(ends)}), {summary}", file=sys.stderr)


if __name__ == "__main__":
    main()
