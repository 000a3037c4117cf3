"""Advantage Weighted Actor-Critic (AWAC), offline: actor-critic with an advantage-weighted actor update.

Nair, Gupta, Dalal, Levine, "AWAC: Accelerating Online Reinforcement Learning with Offline Datasets"
(arXiv 2006.09359), offline phase only, following CORL's single-file reference (corl-team/CORL,
algorithms/offline/awac.py): the AWAC column of Table 1 and Fig. 4 in Akimov et al. (CNF, arXiv
2211.11096). CNF's phase 2 is an advantage-weighted update of this kind, carried into a flow's latent space.

    python algorithms/awac.py --env halfcheetah-medium-v2 --config_path algorithms/configs/awac/locomotion.yaml
    python algorithms/awac.py --config_path algorithms/configs/awac/hopper-medium-v2.yaml     # CORL's per-dataset values
    python algorithms/awac.py --env maze2d-umaze-v1 --config_path algorithms/configs/awac/maze2d.yaml  # d4rl (Docker)
    python algorithms/awac.py --config_path algorithms/configs/awac/quick.yaml               # CPU quick preset
    python algorithms/awac.py --dataset_path FILE.hdf5 --eval_env Hopper-v4                  # any D4RL-format file

One update (`AWAC.train`), in CORL's order, on a batch (s, a, r, s', done):
1. critics: Q_i(s, a) regress y = r + gamma (1 - done) min_j Q_j'(s', a'), a' ~ pi(. | s') clamped to
   the action box, Q_j' the target critics; loss MSE(Q_1, y) + MSE(Q_2, y);
2. actor (weighted maximum likelihood): loss mean(w * -log pi(a | s)), w = min(exp(A / lambda), 100),
   A(s, a) = Q(s, a) - Q(s, a~), a~ ~ pi(. | s) clamped, Q = min(Q_1, Q_2) of the critics *after*
   step 1;
3. Polyak averaging of the target critics, rate tau = 5e-3.
The actor is CORL's: a Gaussian N(mu(s), sigma^2) whose mean is an unsquashed MLP and whose log-std is a
learned state-independent vector (init 0) clamped to [-20, 2]; acting uses the mean. Actor and
critics have 3 hidden layers of 256 (ReLU). Adam, lr 3e-4 for all.

Data sources (`--env`, `--dataset_path`, bundled `*-gymv5` datasets), state normalisation and
evaluation are cnf.py's (copied blocks; see cnf.py's docstring). `--reward_scaling` (default none, as
CORL's `normalize_reward: False`) offers CORL's reward modification: `returns` scales by
1000 / (max episode return - min episode return), `antmaze` shifts to r - 1 (CORL's antmaze configs).

Choices where CORL is silent, and deliberate deviations from it:
- TrainConfig defaults are CORL's code defaults (lambda 1.0, no reward scaling). CORL's benchmark runs
  use per-family values: lambda 1/3 for locomotion, 0.1 for maze2d and antmaze, antmaze rewards
  r - 1, 100 evaluation episodes for maze2d and antmaze: configs/awac/{locomotion,maze2d,antmaze}.yaml.
- Evaluation every 5000 updates (the CNF paper's protocol for every method; CORL's AWAC evaluates every
  1000), so `last10_mean_normalized_score` covers the last 50k updates as for the other methods.
- Evaluation actions are the policy mean clamped to [-1, 1]; CORL passes the unclamped mean (MuJoCo
  clips the control, but the env's control cost sees the unclipped action).
- Q_1 and Q_2 are one vectorised ensemble (cnf.py's TwinCritic) with one Adam: identical to CORL's two
  critics with two Adams (Adam is element-wise). The advantage's two critic passes (dataset action,
  policy action) run as one batched pass. All Adams are the fused kind.
- The Gaussian log-density is written out; torch.distributions.Normal validates its arguments with a
  host sync at every update. Same values. `train(batch)` returns tensors: no host sync per update.
- Episode returns for `--reward_scaling returns` come from the true episode boundaries (see
  `episode_returns`), not from CORL's 1000-step windows over the converted data, which drift off the
  boundaries by one row at every dropped timeout row.
- Batches are drawn with torch.randint on the training device (CORL: numpy on the host). Same law.
  CORL's configs set torch.use_deterministic_algorithms; not done here (no effect on the CPU path).
- Checkpoints hold networks, optimizers and target critics (CORL saves only the online networks), so
  `--resume` continues exactly.
- Antmaze: cnf.py's data block resolves locomotion and maze2d names only; antmaze runs need
  `--dataset_path FILE --eval_env ID` with configs/awac/antmaze.yaml.
"""
import copy
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

ALGORITHM = "awac"


# ---- [block: config | copied from cnf.py | renames: phase-2 gradient updates (paper: 1M; HalfCheetah 200k)->gradient updates (CORL: 1M), batch_size: int = 512  # phase-2 batch size (paper:->batch_size: int = 256  # batch size (CORL; the CNF paper's grid for CNF:] ----
@dataclass
class TrainConfig:
    # --- experiment ---
    env: str = "halfcheetah-medium-gymv5"  # D4RL name (halfcheetah-medium-v2, ...) or bundled dataset name
    dataset_path: Optional[str] = None  # any D4RL-format HDF5 file; overrides --env
    eval_env: Optional[str] = None  # Gymnasium id to evaluate in (default: from the data source)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # torch device
    cpu_threads: Optional[int] = None  # torch CPU threads (default: torch's, one per core)
    seed: int = 0  # seeds python, numpy, torch and the evaluation envs
    train_steps: int = 1_000_000  # gradient updates (CORL: 1M)
    batch_size: int = 256  # batch size (CORL; the CNF paper's grid for CNF: {256, 512, 1024}; maze2d 10240)
    eval_every: int = 5_000  # updates between evaluations
    eval_episodes: int = 10  # episodes per evaluation, stepped together in a vector env
    log_every: int = 1_000  # updates between logged losses (the only host syncs of the loop)
    checkpoints_path: str = "runs"  # run directories are created here
    run_name: Optional[str] = None  # run directory name (default: <algo>-<env>-seed<seed>-<time>)
    resume: Optional[str] = None  # RUN_DIR of a stopped run: continue from its last checkpoint
    config_path: Optional[str] = None  # YAML (pyrallis) with values for any field; flags override it
    wandb_mode: str = "offline"  # online | offline | disabled
    wandb_project: str = "cnf"  # wandb project
    # ---- [end block: config] ---------------------------------------------------------------------------
    # --- AWAC (CORL's awac.py) ---
    hidden_dim: int = 256  # actor and critic width
    n_layers: int = 4  # linear layers in actor and critics (CORL: 3 hidden layers)
    actor_lr: float = 3e-4  # actor learning rate (CORL: one learning_rate for all)
    critic_lr: float = 3e-4  # critic learning rate
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # Polyak rate of the target critics
    awac_lambda: float = 1.0  # temperature lambda of exp(A / lambda) (CORL's configs: 1/3 locomotion, 0.1 maze2d, antmaze)
    exp_adv_max: float = 100.0  # clamp of the advantage weights
    log_std_min: float = -20.0  # clamp of the actor's log-std
    log_std_max: float = 2.0
    reward_scaling: str = "none"  # none | returns (r * 1000 / (max - min episode return)) | antmaze (r - 1) | auto


# ---- [block: data | copied from cnf.py] ----
D4RL_LOCOMOTION = re.compile(r"^(halfcheetah|hopper|walker2d)-(random|medium|medium-replay|medium-expert|expert|full-replay)-v2$")
D4RL_MAZE2D = re.compile(r"^maze2d-(umaze|medium|large)-v1$")
BUNDLED = re.compile(r"^(halfcheetah|hopper|walker2d)-(random|medium|medium-replay|expert|medium-expert)-gymv5$")
D4RL_REF_SCORES = {  # D4RL's (random, expert) returns: normalised score = 100 (R - min) / (max - min)
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3),
    "maze2d-umaze": (23.85, 161.86), "maze2d-medium": (13.13, 277.39), "maze2d-large": (6.7, 273.99),
}
GYMNASIUM_IDS = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class OfflineData:
    """Transitions after D4RL's q-learning conversion, plus how to evaluate and score on them."""

    name: str
    observations: np.ndarray  # [N, obs_dim] float32
    actions: np.ndarray  # [N, act_dim] float32, inside [-1, 1]
    rewards: np.ndarray  # [N] float32
    next_observations: np.ndarray  # [N, obs_dim] float32
    dones: np.ndarray  # [N] float32, 1 where the episode terminated (not timed out)
    make_eval_env: Callable[[int], object]  # num_envs -> vector env
    normalize_score: Callable[[np.ndarray], np.ndarray]  # episode returns -> 100 x normalised


def qlearning_dataset(raw: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """D4RL's `qlearning_dataset`: next observation = the next row; rows whose `timeouts` is set
    (the last step of an episode cut by the time limit) are dropped, terminal rows are kept with
    done = 1, and the file's last row is dropped (it has no next row)."""
    n = len(raw["rewards"])
    keep = np.flatnonzero(~raw["timeouts"][: n - 1].astype(bool))
    return {
        "observations": raw["observations"][keep],
        "actions": raw["actions"][keep],
        "rewards": raw["rewards"][keep],
        "next_observations": raw["observations"][keep + 1],
        "dones": raw["terminals"][keep].astype(np.float32),
    }


def read_hdf5(path: str) -> Dict[str, np.ndarray]:
    import h5py

    if not os.path.isfile(path):
        raise SystemExit(f"error: dataset file {path} does not exist; check the path "
                         f"(D4RL files: python data/download_d4rl.py NAME)")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k not in f]
            if missing:
                raise SystemExit(f"error: {path} lacks the D4RL keys {missing}; see data/README.md for the format")
            raw = {k: f[k][:] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
            raw["attrs"] = dict(f.attrs)
    except OSError as e:
        raise SystemExit(f"error: {path} is not a readable HDF5 file ({e}); download or generate it again") from None
    return raw


def check_dataset(raw: Dict[str, np.ndarray], source: str) -> Dict[str, np.ndarray]:
    """Shapes, NaNs and the action box, each with a message that says what to do."""
    obs, act = np.asarray(raw["observations"]), np.asarray(raw["actions"])
    n = len(obs)
    if obs.ndim != 2 or act.ndim != 2 or n == 0:
        raise SystemExit(f"error: {source}: observations and actions must be 2-D [N, dim] arrays, "
                         f"got {obs.shape} and {act.shape}")
    for key in ("actions", "rewards", "terminals", "timeouts"):
        if len(raw[key]) != n:
            raise SystemExit(f"error: {source}: '{key}' has {len(raw[key])} rows but observations have {n}")
    for key in ("observations", "actions", "rewards"):
        bad = ~np.isfinite(np.asarray(raw[key]).reshape(n, -1)).all(axis=1)
        if bad.any():
            raise SystemExit(f"error: {source}: {bad.sum()} rows of '{key}' hold NaN or inf "
                             f"(first: row {np.flatnonzero(bad)[0]}); remove or repair them")
    worst = np.abs(act).max()
    if worst > 1.0 + 1e-4:
        row = np.flatnonzero(np.abs(act).max(axis=1) > 1.0 + 1e-4)[0]
        raise SystemExit(f"error: {source}: actions must lie in [-1, 1] (max |a| = {worst:.4g}, row {row}); "
                         f"rescale them to the env's action box first")
    raw["observations"] = obs.astype(np.float32)
    raw["actions"] = np.clip(act, -1.0, 1.0).astype(np.float32)
    raw["rewards"] = np.asarray(raw["rewards"], dtype=np.float32)
    return raw


def d4rl_filename(name: str) -> str:
    """The file name d4rl caches a dataset under (the basename of its URL)."""
    if D4RL_MAZE2D.match(name):
        return name.replace("-v1", "-sparse-v1") + ".hdf5"
    env, level = name[: -len("-v2")].split("-", 1)
    return f"{env}_{level.replace('-', '_')}-v2.hdf5"


def gymnasium_vector_env(env_id: str) -> Callable[[int], object]:
    def make(num_envs: int):
        import gymnasium

        return gymnasium.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")

    return make


def reference_normalizer(low: float, high: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda returns: 100.0 * (np.asarray(returns) - low) / (high - low)


def bundled_dataset_path(name: str) -> str:
    """Find a bundled dataset in the cache; on first use generate it from the shipped policy."""
    cache = Path(os.environ.get("CNF_DATA_DIR", Path.home() / ".cache" / "cnf" / "datasets"))
    path = cache / f"{name}.hdf5"
    if not path.exists():
        env, level = BUNDLED.match(name).groups()
        print(f"generating the bundled dataset {name} into {path} (once; later runs reuse it)", file=sys.stderr)
        cmd = [sys.executable, str(REPO_ROOT / "data" / "generate.py"), "--env", f"{GYMNASIUM_IDS[env]}-v5",
               "--level", level, "--num_steps", "1000000", "--seed", "0", "--out", str(path)]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"error: could not generate {name}; run {' '.join(cmd[1:])} to see why")
    return str(path)


def load_offline_data(config: TrainConfig) -> OfflineData:
    """Resolve --dataset_path / --env to transitions, an evaluation env and a score normaliser."""
    name = config.env
    if config.dataset_path is not None:
        name, raw = Path(config.dataset_path).stem, read_hdf5(config.dataset_path)
        attrs = raw.pop("attrs")
        eval_env = config.eval_env or attrs.get("env")
        if eval_env is None:
            raise SystemExit(f"error: {config.dataset_path} has no 'env' attribute; pass --eval_env (a Gymnasium id)")
        d4rl_key = next((k for k in D4RL_REF_SCORES if name.startswith(k)), None)
        if "ref_min_score" in attrs:
            low, high = float(attrs["ref_min_score"]), float(attrs["ref_max_score"])
        elif d4rl_key is not None:
            low, high = D4RL_REF_SCORES[d4rl_key]
        else:
            raise SystemExit(f"error: {config.dataset_path} has no ref_min_score/ref_max_score attributes "
                             f"to normalise scores with; add them (see data/README.md)")
        make_env, normalize = gymnasium_vector_env(str(eval_env)), reference_normalizer(low, high)
    elif D4RL_LOCOMOTION.match(name) or D4RL_MAZE2D.match(name):
        try:
            import gym
            import d4rl  # noqa: F401  (registers the D4RL envs)
        except ImportError:
            d4rl = None
        if d4rl is not None:  # the Docker path: d4rl's own loader, env and score
            env = gym.make(name)
            raw = env.get_dataset()
            make_env = lambda n: gym.vector.SyncVectorEnv([lambda: gym.make(name)] * n)  # noqa: E731
            normalize = lambda r: 100.0 * np.asarray([d4rl.get_normalized_score(name, x) for x in np.atleast_1d(r)])  # noqa: E731
        else:
            if D4RL_MAZE2D.match(name):
                raise SystemExit(f"error: {name} needs d4rl (maze2d has no Gymnasium equivalent): use the Docker image")
            path = Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets")) / d4rl_filename(name)
            if not path.exists():
                raise SystemExit(f"error: d4rl is not installed and {path} does not exist; "
                                 f"run: python data/download_d4rl.py {name}")
            raw = read_hdf5(str(path))
            raw.pop("attrs")
            env_key = name.split("-")[0]
            make_env = gymnasium_vector_env(config.eval_env or f"{GYMNASIUM_IDS[env_key]}-v4")
            normalize = reference_normalizer(*D4RL_REF_SCORES[env_key])
    elif BUNDLED.match(name):
        raw = read_hdf5(bundled_dataset_path(name))
        attrs = raw.pop("attrs")
        make_env = gymnasium_vector_env(config.eval_env or str(attrs["env"]))
        normalize = reference_normalizer(float(attrs["ref_min_score"]), float(attrs["ref_max_score"]))
    else:
        raise SystemExit(f"error: unknown --env {name!r}; use a D4RL name (e.g. halfcheetah-medium-v2, "
                         f"maze2d-umaze-v1), a bundled one (e.g. halfcheetah-medium-gymv5), or --dataset_path FILE")
    data = qlearning_dataset(check_dataset(raw, config.dataset_path or name))
    return OfflineData(name=name, make_eval_env=make_env, normalize_score=normalize, **data)


def check_eval_env(envs, data: OfflineData) -> None:
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    if (obs_dim, act_dim) != (data.observations.shape[1], data.actions.shape[1]):
        raise SystemExit(f"error: the data has {data.observations.shape[1]}-dim observations and "
                         f"{data.actions.shape[1]}-dim actions, the evaluation env {obs_dim} and {act_dim}; "
                         f"pass the matching --eval_env")


class ReplayBuffer:
    """The whole dataset on the training device, states normalised once; sampling never syncs."""

    def __init__(self, data: OfflineData, device: str):
        self.state_mean = data.observations.mean(0)
        self.state_std = data.observations.std(0) + 1e-3
        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)  # noqa: E731
        self.states = as_tensor((data.observations - self.state_mean) / self.state_std)
        self.next_states = as_tensor((data.next_observations - self.state_mean) / self.state_std)
        self.actions = as_tensor(data.actions)
        self.rewards = as_tensor(data.rewards)[:, None]  # [N, 1]
        self.dones = as_tensor(data.dones)[:, None]  # [N, 1]
        self.size, self.device = len(self.states), device

    def sample(self, batch_size: int) -> Tuple[torch.Tensor, ...]:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx], self.dones[idx]
# ---- [end block: data] -----------------------------------------------------------------------------


# ---- [block: reward scaling | copied from iql.py] ----
REWARD_SCALINGS = ("auto", "returns", "antmaze", "none")
LOCOMOTION_NAME = re.compile(r"^(halfcheetah|hopper|walker2d)", re.IGNORECASE)
ANTMAZE_NAME = re.compile(r"ant_?maze", re.IGNORECASE)


def episode_returns(data: OfflineData) -> np.ndarray:
    """The return of every episode of the converted data. An episode ends at a terminal transition, or
    where the next transition does not start from this one's next observation (a timeout row that the
    q-learning conversion dropped, or the end of the file): the boundaries the file's terminals and
    timeouts set. The last episode counts even if the file cuts it."""
    ends = data.dones > 0
    ends[:-1] |= (data.next_observations[:-1] != data.observations[1:]).any(axis=1)
    ends[-1] = True
    starts = np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1])
    return np.add.reduceat(data.rewards.astype(np.float64), starts)


def scale_rewards(data: OfflineData, scaling: str) -> Tuple[OfflineData, dict]:
    """CORL's reward modification, as r' = scale * r + shift: `returns` scale = 1000 / (max - min
    episode return) (locomotion), `antmaze` shift = -1, `none`; `auto` picks by the dataset's name."""
    if scaling not in REWARD_SCALINGS:
        raise SystemExit(f"error: --reward_scaling must be one of {', '.join(REWARD_SCALINGS)}, not {scaling!r}")
    if scaling == "auto":
        scaling = "returns" if LOCOMOTION_NAME.match(data.name) else "antmaze" if ANTMAZE_NAME.search(data.name) else "none"
    scale, shift = 1.0, 0.0
    if scaling == "returns":
        returns = episode_returns(data)
        if returns.max() - returns.min() <= 0:
            raise SystemExit(f"error: --reward_scaling returns needs episodes with different returns; {data.name} has "
                             f"{len(returns)} episode(s) all returning {returns.max():.4g}: pass --reward_scaling none")
        scale = 1000.0 / float(returns.max() - returns.min())
    elif scaling == "antmaze":
        shift = -1.0
    rewards = (scale * data.rewards + shift).astype(np.float32)
    return replace(data, rewards=rewards), {"reward_scaling": scaling, "reward_scale": scale, "reward_shift": shift}
# ---- [end block: reward scaling] -------------------------------------------------------------------


# ---- [block: evaluation | copied from cnf.py] ----
@torch.no_grad()
def evaluate(make_env: Callable[[int], object], act: Callable[[torch.Tensor], torch.Tensor],
             state_mean: np.ndarray, state_std: np.ndarray, episodes: int, seed: int, device: str) -> np.ndarray:
    """Return of `episodes` episodes stepped together in one vector env; `act` maps normalised
    states [episodes, obs_dim] to actions. Works with Gymnasium's and old gym's vector envs."""
    envs = make_env(episodes)
    reset = envs.reset(seed=seed)
    obs = reset[0] if isinstance(reset, tuple) else reset
    returns, running = np.zeros(episodes), np.ones(episodes, dtype=bool)
    while running.any():
        states = torch.as_tensor((obs - state_mean) / state_std, dtype=torch.float32, device=device)
        out = envs.step(act(states).cpu().numpy())
        if len(out) == 5:  # Gymnasium: obs, reward, terminated, truncated, info
            obs, reward, terminated, truncated, _ = out
            done = terminated | truncated
        else:  # gym 0.23: obs, reward, done, info
            obs, reward, done, _ = out
        returns += reward * running  # an env that finished keeps auto-resetting: ignore it
        running &= ~np.asarray(done, dtype=bool)
    envs.close()
    return returns
# ---- [end block: evaluation] -----------------------------------------------------------------------


# ---- [block: utilities | copied from cnf.py] ----
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state, in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temp file, then rename: a crash or kill never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def torch_load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class RunLogger:
    """wandb (offline by default) plus metrics.jsonl in the run directory, so curves never need wandb."""

    def __init__(self, config: TrainConfig, run_dir: Path):
        import wandb

        self.file = open(run_dir / "metrics.jsonl", "a")
        self.wandb = wandb.init(project=config.wandb_project, group=f"{ALGORITHM}-{config.env}",
                                name=run_dir.name, config=asdict(config), dir=str(run_dir),
                                mode=config.wandb_mode, resume="allow", id=run_dir.name.replace("/", "_"))

    def log(self, metrics: Dict[str, float], step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        self.wandb.finish()


def parse_config(config_class, argv: List[str]):
    """tyro flags over an optional pyrallis YAML (--config_path): flags win over the file."""
    import pyrallis
    import tyro

    default = config_class()
    if "--config_path" in argv:
        path = argv[argv.index("--config_path") + 1]
        if not os.path.isfile(path):
            raise SystemExit(f"error: --config_path {path} does not exist")
        with open(path) as f:
            default = pyrallis.load(config_class, f)
    config = tyro.cli(config_class, args=argv, default=default, use_underscores=True)
    if config.resume is not None:  # a resumed run keeps its own config (flags may still change it)
        saved = Path(config.resume) / "config.yaml"
        if not saved.is_file():
            raise SystemExit(f"error: --resume {config.resume} is not a run directory (no config.yaml)")
        with open(saved) as f:
            default = pyrallis.load(config_class, f)
        config = tyro.cli(config_class, args=argv, default=default, use_underscores=True)
    if config.wandb_mode not in ("online", "offline", "disabled"):
        raise SystemExit(f"error: --wandb_mode must be online, offline or disabled, not {config.wandb_mode!r}")
    return config


def make_run_dir(config: TrainConfig, data_name: str) -> Path:
    import pyrallis

    if config.resume is not None:
        run_dir = Path(config.resume)
    else:
        name = config.run_name or f"{ALGORITHM}-{data_name}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(config.checkpoints_path) / name
        run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    with open(tmp, "w") as f:
        pyrallis.dump(config, f)
    os.replace(tmp, run_dir / "config.yaml")
    return run_dir


def write_results(run_dir: Path, results: dict) -> Path:
    path = run_dir / "results.json"
    tmp = run_dir / ".results.json.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
    return path


def summarize(evaluations: List[Tuple[int, float]]) -> dict:
    scores = [score for _, score in evaluations]
    return {
        "final_normalized_score": scores[-1] if scores else None,
        "best_normalized_score": max(scores) if scores else None,
        "last10_mean_normalized_score": float(np.mean(scores[-10:])) if scores else None,
        "evaluations": [{"step": step, "normalized_score": score} for step, score in evaluations],
    }
# ---- [end block: utilities] ------------------------------------------------------------------------


# ---- [block: networks | copied from cnf.py] ----
def mlp(in_dim: int, out_dim: int, hidden: int, n_layers: int, activation=nn.ReLU) -> nn.Sequential:
    """n_layers linear layers with `activation` between them."""
    dims = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
    layers: List[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


class VectorizedLinear(nn.Module):
    """`ensemble` independent linear layers applied in one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, in_dim: int, out_dim: int, ensemble: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(ensemble, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinCritic(nn.Module):
    """Q1 and Q2 (n_layers x hidden, ReLU) as one vectorised ensemble: Q(s, a) -> [2, B, 1] (float32)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, n_layers: int, amp: bool = False):
        super().__init__()
        self.amp = amp  # bfloat16 matmuls
        dims = [state_dim + action_dim] + [hidden] * (n_layers - 1) + [1]
        layers: List[nn.Module] = []
        for i in range(n_layers):
            layers.append(VectorizedLinear(dims[i], dims[i + 1], ensemble=2))
            if i < n_layers - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([states, actions], dim=-1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.net(x.unsqueeze(0).expand(2, -1, -1)).float()
# ---- [end block: networks] -------------------------------------------------------------------------


# ---- [block: gaussian log density | copied from iql.py] ----
def normal_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, diag(exp(log_std))^2), summed over action dimensions: [B, act_dim] -> [B, 1]."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std).sum(-1, keepdim=True) - 0.5 * actions.shape[-1] * math.log(2.0 * math.pi)
# ---- [end block: gaussian log density] -------------------------------------------------------------


class GaussianPolicy(nn.Module):
    """pi(a | s) = N(mu(s), sigma^2): mu an MLP with no output squashing, log sigma a learned
    state-independent vector (init 0) clamped to [log_std_min, log_std_max] (CORL's AWAC Actor).
    Samples are clamped to the action box [-1, 1], as CORL does."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, n_layers: int, log_std_min: float, log_std_max: float):
        super().__init__()
        self.net = mlp(state_dim, action_dim, hidden, n_layers)
        self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def log_prob(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a | s): [B, 1]."""
        return normal_log_prob(actions, self.net(states), self.log_std.clamp(self.log_std_min, self.log_std_max))

    @torch.no_grad()
    def sample(self, states: torch.Tensor) -> torch.Tensor:
        """a ~ pi(. | s), clamped to [-1, 1]."""
        mean = self.net(states)
        std = self.log_std.clamp(self.log_std_min, self.log_std_max).exp()
        return (mean + std * torch.randn_like(mean)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def deterministic(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states).clamp(-1.0, 1.0)


def advantage_weights(advantages: torch.Tensor, awac_lambda: float, max_weight: float) -> torch.Tensor:
    """exp(A / lambda), clamped at max_weight (CORL: 100)."""
    return torch.exp(advantages / awac_lambda).clamp(max=max_weight)


class AWAC:
    """Gaussian actor and twin critics with target critics; `train(batch)` is one update (steps 1-3 above)."""

    def __init__(self, state_dim: int, action_dim: int, config: TrainConfig):
        self.config = config
        self.actor = GaussianPolicy(state_dim, action_dim, config.hidden_dim, config.n_layers,
                                    config.log_std_min, config.log_std_max).to(config.device)
        self.critic = TwinCritic(state_dim, action_dim, config.hidden_dim, config.n_layers).to(config.device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=fused)

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        states, actions, rewards, next_states, dones = batch
        cfg = self.config
        # 1. Critics: y = r + gamma (1 - d) min_j Q_j'(s', a'), a' ~ pi(. | s').
        with torch.no_grad():
            next_q = self.target_critic(next_states, self.actor.sample(next_states)).min(0).values  # [B, 1]
            target = rewards + cfg.gamma * (1.0 - dones) * next_q
        q = self.critic(states, actions)  # [2, B, 1]
        critic_loss = ((q - target) ** 2).mean(dim=(1, 2)).sum()  # MSE of Q1 plus MSE of Q2
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        # 2. Actor: A(s, a) = Q(s, a) - Q(s, a~), a~ ~ pi(. | s), Q = min(Q1, Q2) of the updated critics,
        # both actions in one batched pass; loss = mean(exp(A / lambda) * -log pi(a | s)).
        with torch.no_grad():
            both = self.critic(torch.cat([states, states]), torch.cat([actions, self.actor.sample(states)]))
            q_data, q_policy = both.min(0).values.chunk(2)  # [B, 1] each
            weights = advantage_weights(q_data - q_policy, cfg.awac_lambda, cfg.exp_adv_max)
        actor_loss = -(weights * self.actor.log_prob(states, actions)).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        with torch.no_grad():  # 3. Polyak averaging of the target critics, one fused op
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), cfg.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(),
                "q_mean": q.detach().mean(), "adv_weight_mean": weights.mean()}

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Evaluation: the policy's mean, clamped to the action box."""
        return self.actor.deterministic(states)

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "target_critic": self.target_critic.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])


# ---- The loop ------------------------------------------------------------------------------------
def train(config: TrainConfig) -> Path:
    """Training, evaluation, checkpoints and results.json; returns the results.json path."""
    from tqdm import trange

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; pass --device cpu")
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    data, rewards_info = scale_rewards(load_offline_data(config), config.reward_scaling)
    probe = data.make_eval_env(1)
    check_eval_env(probe, data)
    probe.close()
    run_dir = make_run_dir(config, data.name)
    checkpoint = torch_load(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").exists() else None
    set_seed(config.seed)
    buffer = ReplayBuffer(data, config.device)
    logger = RunLogger(config, run_dir)
    started = time.time()
    agent = AWAC(buffer.states.shape[1], buffer.actions.shape[1], config)

    start, evaluations = 0, []
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        start, evaluations = checkpoint["step"], [tuple(e) for e in checkpoint["evaluations"]]
        set_rng_state(checkpoint["rng"])
    update_time = 0.0
    for step in trange(start + 1, config.train_steps + 1, desc="AWAC", initial=start,
                       total=config.train_steps, mininterval=5):
        tick = time.perf_counter()
        metrics = agent.train(buffer.sample(config.batch_size))
        update_time += time.perf_counter() - tick
        if step % config.log_every == 0:
            logger.log({k: v.item() for k, v in metrics.items()}, step=step)
        if step % config.eval_every == 0 or step == config.train_steps:
            returns = evaluate(data.make_eval_env, agent.act, buffer.state_mean, buffer.state_std,
                               config.eval_episodes, config.seed, config.device)
            score = float(np.mean(data.normalize_score(returns)))
            evaluations.append((step, score))
            logger.log({"eval/normalized_score": score, "eval/return": float(returns.mean())}, step=step)
            save_atomic({"step": step, "agent": agent.state_dict(), "evaluations": evaluations,
                         "rng": rng_state()}, run_dir / "checkpoint.pt")
    logger.close()
    done = config.train_steps - start
    results = {"algorithm": ALGORITHM, "dataset": data.name, **summarize(evaluations),
               "train_steps": config.train_steps, "wall_time_s": time.time() - started,
               "updates_per_s": done / update_time if update_time > 0 else None, **rewards_info}
    return write_results(run_dir, results)


if __name__ == "__main__":
    path = train(parse_config(TrainConfig, sys.argv[1:]))
    print(f"results: {path}")
