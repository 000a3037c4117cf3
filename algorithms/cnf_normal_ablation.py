"""CNF's Normal-latent ablation: a flow with base N(0, I), and a latent policy unbounded or clipped.

Companion to Akimov et al., "Let Offline RL Flow: Training Conservative Agents in the Latent Space
of Normalizing Flows" (arXiv 2211.11096): Fig. 5 (Normal latent, unbounded policy N(mu, sigma):
performance collapses), Fig. 6 (Normal latent, policy clipped to z = a tanh(N(mu, sigma)): the best
a differs per dataset) and, together with cnf.py's logs, Fig. 8 (flow NLL curves, Uniform vs Normal).

    python algorithms/cnf_normal_ablation.py --env halfcheetah-medium-v2 --train_steps 200000       # Fig. 5
    python algorithms/cnf_normal_ablation.py --env walker2d-medium-v2 --latent_clip 2               # Fig. 6, a = 2
    python algorithms/cnf_normal_ablation.py --config_path algorithms/configs/cnf_normal_ablation/quick.yaml
    python algorithms/cnf_normal_ablation.py --config_path algorithms/configs/cnf_normal_ablation/quick_clip2.yaml

Fig. 6 sweeps a over {1, 2, 3, ...} (`--latent_clip 1`, `--latent_clip 2`, ...). Fig. 8: phase 1 logs
`flow/train_nll` (mean over the steps since the last validation) and `flow/valid_nll` (10% held-out
split) to RUN_DIR/metrics.jsonl exactly as cnf.py does; run both scripts with the same data, seed and
flow flags and plot the two files. Both are negative log-likelihoods of actions in (-1, 1)^n, so the
curves are directly comparable (the change of variables through atanh is in both).

Everything is cnf.py's (data sources, phase 1, Algorithm 2, evaluation, checkpoints: see its
docstring; the shared blocks are copied verbatim) except:
- The flow (`NormalConditionalFlow`): cnf.py's atanh first layer and K blocks, but no final tanh;
  base N(0, I), log pi_beta(a | s) = log N(f(a | s); 0, I) + log|det df/da|. Its decoder takes any
  latent in R^n (no atanh on the latent side); the action still lands in (-1, 1)^n through the
  atanh layer's inverse, but a latent far from N(0, I)'s bulk decodes to an action the data never
  had, which is what Fig. 5 shows the policy exploiting.
- The latent policy (`LatentPolicy`): by default z = mu + sigma * eps with no squashing (Fig. 5);
  `--latent_clip a` (a > 0) gives z = a tanh(mu + sigma * eps) (Fig. 6). Acting uses z = mu(s), or
  a tanh(mu(s)). cnf.py's policy is the a = 1 case, and with its Uniform flow a = 1 is the whole box.
- flow.pt records `base_distribution: normal`, and --flow_checkpoint refuses any other flow: cnf.py's
  Uniform flows have the same parameter names and would otherwise load silently.

Choices where the paper is silent:
- "Clipped" is read as PLAS's and LAPO's z_max * tanh (smooth, keeps gradients), not a hard clamp
  (zero gradient outside the box). In float32, a tanh(x) equals +-a exactly once |x| > ~9, so the
  clipped latents lie in the closed box a [-1, 1]^n.
- The unbounded policy keeps cnf.py's log-std clamp [-20, 2] and has no mean clamp.
- The paper gives no separate hyperparameters for these figures: flow sizes, optimiser and phase 2
  are cnf.py's defaults (Tables 2-3), so that the latent space is the only difference.
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
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ALGORITHM = "cnf_normal_ablation"
BASE_DISTRIBUTION = "normal"  # written into flow.pt: cnf.py's Uniform flows have the same parameter names


# ---- [block: config | copied from cnf.py] -----------------------------------------------------------
@dataclass
class TrainConfig:
    # --- experiment ---
    env: str = "halfcheetah-medium-gymv5"  # D4RL name (halfcheetah-medium-v2, ...) or bundled dataset name
    dataset_path: Optional[str] = None  # any D4RL-format HDF5 file; overrides --env
    eval_env: Optional[str] = None  # Gymnasium id to evaluate in (default: from the data source)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # torch device
    cpu_threads: Optional[int] = None  # torch CPU threads (default: torch's, one per core)
    seed: int = 0  # seeds python, numpy, torch and the evaluation envs
    train_steps: int = 1_000_000  # phase-2 gradient updates (paper: 1M; HalfCheetah 200k)
    batch_size: int = 512  # phase-2 batch size (paper: {256, 512, 1024}; maze2d 10240)
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
    # --- phase 1: flow pre-training (Algorithm 1, Eq. 5) ---
    flow_checkpoint: Optional[str] = None  # a flow.pt from an earlier run: skip phase 1
    flow_layers: int = 12  # K blocks of ActNorm -> invertible linear -> coupling (medium-replay: 4)
    flow_hidden: int = 256  # coupling conditioner width (medium-replay, maze2d: 64)
    flow_steps: int = 100_000  # pre-training steps
    flow_batch_size: int = 1024  # pre-training batch size
    flow_lr: float = 5e-4  # AdamW learning rate
    flow_weight_decay: float = 1e-4  # AdamW weight decay
    flow_grad_clip: float = 0.1  # gradient-norm clip
    flow_valid_fraction: float = 0.1  # held-out fraction; the best-validation flow is kept
    flow_eval_every: int = 1_000  # steps between validation NLL evaluations
    # --- phase 2: RL in the latent space (Algorithm 2, Eqs. 6-8) ---
    hidden_dim: int = 256  # actor and critic width
    n_layers: int = 4  # linear layers in actor and critics (paper: {3, 4})
    actor_lr: float = 3e-4  # policy learning rate
    critic_lr: float = 3e-4  # critic learning rate
    gamma: float = 0.99  # discount
    tau: float = 2e-3  # Polyak rate of the target critics
    awac_lambda: float = 1.0 / 3.0  # temperature lambda of exp(A / lambda) (maze2d: 1/10)
    exp_adv_max: float = 100.0  # clamp of the advantage weights (official code)
    amp: bool = False  # bfloat16 matmuls in actor, critics and flow conditioners (CPU AMX / GPU tensor cores)
    # --- the ablation (Figs. 5-6) ---
    latent_clip: float = 0.0  # a > 0: policy z = a * tanh(N(mu, sigma)) (Fig. 6); 0: unbounded N(mu, sigma) (Fig. 5)


# ---- [block: data | copied from cnf.py] -------------------------------------------------------------
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


# ---- [block: evaluation | copied from cnf.py] -------------------------------------------------------
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


# ---- [block: utilities | copied from cnf.py] --------------------------------------------------------
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


# ---- [block: networks | copied from cnf.py] ---------------------------------------------------------
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


# ---- [block: flow layers | copied from cnf.py] ------------------------------------------------------
ACTION_EPS = 1e-5  # actions and latents are clamped to [-1 + eps, 1 - eps] (official code)


class ActNorm(nn.Module):
    """y = exp(log_scale) * x + shift, initialised from a batch so that y has zero mean, unit variance."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        std = x.std(0) + 1e-6
        self.log_scale.copy_(-std.log())
        self.shift.copy_(-x.mean(0) / std)

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x * self.log_scale.exp() + self.shift, self.log_scale.sum()

    def decode(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (y - self.shift) * torch.exp(-self.log_scale)


class InvertibleLinear(nn.Module):
    """y = W x with W = P L (U + diag(sign * exp(log_s))) (Glow's LU form): always invertible,
    log|det W| = sum(log_s). Initialised from a random orthogonal matrix (QR), as the official code."""

    def __init__(self, dim: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(dim, dim))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        self.register_buffer("eye", torch.eye(dim))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.permutation @ lower @ upper

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return F.linear(x, self.weight()), self.log_s.sum()

    def decode(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return F.linear(y, torch.linalg.inv(self.weight()))


class AffineCoupling(nn.Module):
    """Keep floor(n/2) dimensions (first or last, alternating with `keep_first`); transform the
    other ceil(n/2) as y = x * exp(log_scale) + shift, where (log_scale, shift) come from an MLP of
    (kept dims, normalised state) and log_scale = r * tanh(raw). The MLP's last layer is zero, so
    a new coupling is the identity. n = 1 keeps nothing: an affine map conditioned on the state."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, keep_first: bool, amp: bool = False):
        super().__init__()
        self.keep_first, self.amp = keep_first, amp  # amp: bfloat16 conditioner matmuls
        self.n_keep, self.n_transform = dim // 2, dim - dim // 2
        self.conditioner = mlp(self.n_keep + cond_dim, 2 * self.n_transform, hidden, 3, nn.PReLU)
        nn.init.zeros_(self.conditioner[-1].weight)
        nn.init.zeros_(self.conditioner[-1].bias)
        self.rescale = nn.Parameter(torch.ones(self.n_transform))  # r

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (kept [B, floor(n/2)], transformed [B, ceil(n/2)])."""
        if self.keep_first:
            return x.split([self.n_keep, self.n_transform], dim=-1)
        transformed, kept = x.split([self.n_transform, self.n_keep], dim=-1)
        return kept, transformed

    def join(self, kept: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, transformed] if self.keep_first else [transformed, kept], dim=-1)

    def scale_shift(self, kept: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(cond.device.type, dtype=torch.bfloat16, enabled=self.amp):
            raw_log_scale, shift = self.conditioner(torch.cat([kept, cond], dim=-1)).float().chunk(2, dim=-1)
        return self.rescale * torch.tanh(raw_log_scale), shift

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        kept, transformed = self.split(x)
        log_scale, shift = self.scale_shift(kept, cond)
        return self.join(kept, transformed * log_scale.exp() + shift), log_scale.sum(-1)

    def decode(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        kept, transformed = self.split(y)
        log_scale, shift = self.scale_shift(kept, cond)
        return self.join(kept, (transformed - shift) * torch.exp(-log_scale))


class FlowBlock(nn.Module):
    """One of the K blocks, data -> latent: ActNorm -> invertible linear -> affine coupling."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, keep_first: bool, amp: bool = False):
        super().__init__()
        self.actnorm = ActNorm(dim)
        self.linear = InvertibleLinear(dim)
        self.coupling = AffineCoupling(dim, cond_dim, hidden, keep_first, amp)

    def encode(self, x: torch.Tensor, cond: torch.Tensor, initialize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        if initialize:
            self.actnorm.initialize(x)
        x, log_det_actnorm = self.actnorm.encode(x, cond)
        x, log_det_linear = self.linear.encode(x, cond)
        x, log_det_coupling = self.coupling.encode(x, cond)
        return x, log_det_actnorm + log_det_linear + log_det_coupling

    def decode(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.actnorm.decode(self.linear.decode(self.coupling.decode(y, cond), cond), cond)


def tanh_log_derivative(h: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(h)^2), computed without cancellation near |h| large."""
    return 2.0 * (math.log(2.0) - h - F.softplus(-2.0 * h))
# ---- [end block: flow layers] ----------------------------------------------------------------------


class NormalConditionalFlow(nn.Module):
    """The ablation's flow f(a | s): data -> latent is atanh -> K x FlowBlock, base N(0, I). It is
    cnf.py's ConditionalFlow without the final tanh, so the latent space is all of R^n; the methods
    are kept line for line parallel to cnf.py's, and the differences are commented.
    `encode` is f (with log|det|), `decode` is f^-1 (no log-det needed). States come normalised.
    With `amp`, only the conditioners' matmuls run in bfloat16; the invertible path stays float32."""

    def __init__(self, action_dim: int, state_dim: int, n_blocks: int, hidden: int, amp: bool = False):
        super().__init__()
        self.action_dim, self.state_dim, self.n_blocks, self.hidden = action_dim, state_dim, n_blocks, hidden
        self.amp = amp
        self.blocks = nn.ModuleList(FlowBlock(action_dim, state_dim, hidden, keep_first=i % 2 == 0, amp=amp)
                                    for i in range(n_blocks))
        self.frozen: Optional[List[dict]] = None  # constants of the phase-2 decoder (see `freeze`)

    def encode(self, actions: torch.Tensor, states: torch.Tensor,
               initialize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """z = f(a | s) and log|det df/da|; `initialize` runs ActNorm's data-dependent init."""
        a = actions.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)
        h = torch.atanh(a)
        log_det = -torch.log1p(-a * a).sum(-1)
        for block in self.blocks:
            h, block_log_det = block.encode(h, states, initialize)
            log_det = log_det + block_log_det
        return h, log_det  # no final tanh (cnf.py: tanh(h), and its log-derivative in log_det)

    def log_prob(self, actions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Eq. 5: log pi_beta(a | s) = log p_Z(f(a | s)) + log|det df/da|; p_Z = N(0, I) (cnf.py: Uniform(-1, 1)^n)."""
        latents, log_det = self.encode(actions, states)
        return log_det - 0.5 * (latents * latents).sum(-1) - 0.5 * self.action_dim * math.log(2.0 * math.pi)

    def decode(self, latents: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """a = f^-1(z | s) for any latent in R^n; the result lies inside (-1, 1)^n (the atanh layer's
        inverse), but a latent far from N(0, I)'s bulk decodes to an action the data never had."""
        h = latents  # no atanh: there is no final tanh to invert (cnf.py: atanh of the clamped latent)
        if self.frozen is None:
            for block in reversed(self.blocks):
                h = block.decode(h, states)
        else:
            h = self.decode_frozen(h, states)
        return torch.tanh(h).clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)

    @torch.no_grad()
    def freeze(self) -> "NormalConditionalFlow":
        """For phase 2: no gradients into the flow, and every constant of f^-1 computed once.
        Call after moving the flow to its device; the constants are not part of the state_dict."""
        self.requires_grad_(False)
        self.eval()
        self.matmul_dtype = torch.bfloat16 if self.amp else self.param_dtype()
        self.frozen, low = [], lambda w: w.to(self.matmul_dtype)
        for block in self.blocks:
            first, prelu_1, second, prelu_2, last = block.coupling.conditioner
            inverse_scale = torch.exp(-block.actnorm.log_scale)
            self.frozen.append({
                # linear^-1 then ActNorm^-1 as one affine map: h -> h @ affine_weight + affine_bias
                "affine_weight": (torch.linalg.inv(block.linear.weight()).T * inverse_scale).contiguous(),
                "affine_bias": -block.actnorm.shift * inverse_scale,
                # conditioner weights, transposed once for addmm; its state part is in state_weight
                "kept_weight": low(first.weight[:, : block.coupling.n_keep].T.contiguous()),
                "prelu_1": low(prelu_1.weight), "weight_2": low(second.weight.T.contiguous()), "bias_2": low(second.bias),
                "prelu_2": low(prelu_2.weight), "weight_3": low(last.weight.T.contiguous()), "bias_3": low(last.bias),
                "neg_rescale": -block.coupling.rescale,
            })
        # The state's contribution to every block's first conditioner layer, for one matmul per batch.
        self.state_weight = low(torch.cat([b.coupling.conditioner[0].weight[:, b.coupling.n_keep:]
                                           for b in self.blocks]).T.contiguous())  # [state_dim, K * hidden]
        self.state_bias = low(torch.cat([b.coupling.conditioner[0].bias for b in self.blocks]))
        return self

    def decode_frozen(self, h: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The blocks' `decode`, computed from the constants of `freeze` (tests check they agree)."""
        state_features = torch.addmm(self.state_bias, states.to(self.matmul_dtype), self.state_weight)
        state_features = state_features.view(len(states), self.n_blocks, self.hidden).unbind(1)
        for block, const, features in zip(reversed(self.blocks), reversed(self.frozen), reversed(state_features)):
            coupling = block.coupling
            kept, transformed = coupling.split(h)
            hidden = torch.addmm(features, kept.to(self.matmul_dtype), const["kept_weight"]) if coupling.n_keep else features
            hidden = F.prelu(torch.addmm(const["bias_2"], F.prelu(hidden, const["prelu_1"]), const["weight_2"]),
                             const["prelu_2"])
            raw_log_scale, shift = torch.addmm(const["bias_3"], hidden, const["weight_3"]).float().chunk(2, dim=-1)
            transformed = (transformed - shift) * torch.exp(const["neg_rescale"] * torch.tanh(raw_log_scale))
            h = torch.addmm(const["affine_bias"], coupling.join(kept, transformed), const["affine_weight"])
        return h

    def param_dtype(self) -> torch.dtype:
        return self.blocks[0].actnorm.shift.dtype

    def describe(self) -> dict:
        return {"action_dim": self.action_dim, "state_dim": self.state_dim,
                "n_blocks": self.n_blocks, "hidden": self.hidden}


class LatentPolicy(nn.Module):
    """pi(z | s) = N(mu(s), sigma(s)) on all of R^n (Fig. 5), or a * tanh(N(mu(s), sigma(s))) with
    latent_clip a > 0 (Fig. 6); log sigma clamped to [-20, 2]; acting uses the mean, mu or a tanh(mu).
    (cnf.py's policy is the a = 1 case, which fills the Uniform flow's latent box exactly.)"""

    def __init__(self, state_dim: int, latent_dim: int, hidden: int, n_layers: int, latent_clip: float = 0.0,
                 amp: bool = False):
        super().__init__()
        self.net, self.amp = mlp(state_dim, 2 * latent_dim, hidden, n_layers), amp
        self.latent_clip = latent_clip  # a; 0 = no squashing

    def mean_log_std(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            mean, log_std = self.net(states).float().chunk(2, dim=-1)
        return mean, log_std.clamp(-20.0, 2.0)

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        """z = a tanh(x) with a latent clip a > 0 (cnf.py: tanh(x)); without one, z = x, unbounded."""
        return self.latent_clip * torch.tanh(x) if self.latent_clip > 0 else x

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """A reparameterised sample z (gradients flow to mu and sigma)."""
        mean, log_std = self.mean_log_std(states)
        return self.squash(mean + log_std.exp() * torch.randn_like(mean))

    def deterministic(self, states: torch.Tensor) -> torch.Tensor:
        return self.squash(self.mean_log_std(states)[0])


# ---- Phase 1: flow pre-training (Algorithm 1) -------------------------------------------------------
# ---- [block: flow pretraining | copied from cnf.py | renames: ConditionalFlow->NormalConditionalFlow] ---
class FlowPretrainer:
    """Maximum likelihood (Eq. 5) with AdamW and gradient-norm clipping; one `train` call = one step."""

    def __init__(self, flow: NormalConditionalFlow, config: TrainConfig):
        self.flow, self.config = flow, config
        self.optimizer = torch.optim.AdamW(flow.parameters(), lr=config.flow_lr, weight_decay=config.flow_weight_decay)

    def train(self, actions: torch.Tensor, states: torch.Tensor) -> Dict[str, torch.Tensor]:
        nll = -self.flow.log_prob(actions, states).mean()
        self.optimizer.zero_grad(set_to_none=True)
        nll.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.flow.parameters(), self.config.flow_grad_clip)
        self.optimizer.step()
        return {"flow/train_nll": nll.detach(), "flow/grad_norm": grad_norm}

    @torch.no_grad()
    def validation_nll(self, actions: torch.Tensor, states: torch.Tensor, chunk: int = 16384) -> float:
        self.flow.eval()
        total = sum(-self.flow.log_prob(actions[i:i + chunk], states[i:i + chunk]).sum()
                    for i in range(0, len(actions), chunk))
        self.flow.train()
        return float(total) / len(actions)

    def state_dict(self) -> dict:
        return {"flow": self.flow.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.flow.load_state_dict(state["flow"])
        self.optimizer.load_state_dict(state["optimizer"])


def load_flow(path: str, buffer: ReplayBuffer, device: str, amp: bool) -> NormalConditionalFlow:
    """A flow.pt written by phase 1 (flow weights, sizes, and the state normalisation it saw)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --flow_checkpoint {path} does not exist")
    saved = torch_load(path)
    if saved.get("base_distribution") != BASE_DISTRIBUTION:
        raise SystemExit(f"error: --flow_checkpoint {path} has a {saved.get('base_distribution')} latent; "
                         f"this script needs a {BASE_DISTRIBUTION}-latent flow.pt")
    flow = NormalConditionalFlow(**saved["sizes"], amp=amp)
    if (flow.action_dim, flow.state_dim) != (buffer.actions.shape[1], buffer.states.shape[1]):
        raise SystemExit(f"error: --flow_checkpoint {path} was trained for {flow.action_dim}-dim actions and "
                         f"{flow.state_dim}-dim states; this data has {buffer.actions.shape[1]} and {buffer.states.shape[1]}")
    flow.load_state_dict(saved["flow"])
    if not np.allclose(saved["state_mean"].numpy(), buffer.state_mean, atol=1e-4):
        warnings.warn(f"{path} was trained with another state normalisation (another dataset?)")
    return flow.to(device)


def pretrain_flow(config: TrainConfig, buffer: ReplayBuffer, run_dir: Path, logger: RunLogger,
                  checkpoint: Optional[dict]) -> NormalConditionalFlow:
    """Phase 1: returns the best-validation flow; writes it to RUN_DIR/flow.pt."""
    from tqdm import trange

    device = config.device
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(buffer.size, generator=generator).to(device)
    n_valid = max(1, int(config.flow_valid_fraction * buffer.size))
    valid, train = order[:n_valid], order[n_valid:]
    flow = NormalConditionalFlow(buffer.actions.shape[1], buffer.states.shape[1], config.flow_layers, config.flow_hidden,
                           config.amp).to(device)
    trainer = FlowPretrainer(flow, config)
    start, best_nll, best_state = 0, float("inf"), None
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint["pretrainer"])
        start, best_nll, best_state = checkpoint["step"], checkpoint["best_valid_nll"], checkpoint["best_flow"]
        set_rng_state(checkpoint["rng"])  # the resumed run draws the batches the uninterrupted one would
    else:
        first = train[torch.randint(0, len(train), (config.flow_batch_size,), device=device)]
        flow.encode(buffer.actions[first], buffer.states[first], initialize=True)  # ActNorm data init
    train_nll, since_log = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    for step in trange(start + 1, config.flow_steps + 1, desc="phase 1: flow", initial=start,
                       total=config.flow_steps, mininterval=5):
        idx = train[torch.randint(0, len(train), (config.flow_batch_size,), device=device)]
        train_nll += trainer.train(buffer.actions[idx], buffer.states[idx])["flow/train_nll"]
        since_log += 1
        if step % config.flow_eval_every == 0 or step == config.flow_steps:
            valid_nll = trainer.validation_nll(buffer.actions[valid], buffer.states[valid])
            logger.log({"flow/train_nll": train_nll.item() / since_log, "flow/valid_nll": valid_nll}, step=step)
            train_nll, since_log = train_nll.zero_(), 0
            if valid_nll < best_nll:
                best_nll, best_state = valid_nll, copy.deepcopy(flow.state_dict())
            save_atomic({"phase": "flow", "step": step, "pretrainer": trainer.state_dict(), "best_valid_nll": best_nll,
                         "best_flow": best_state, "rng": rng_state()}, run_dir / "checkpoint.pt")
    if best_state is None:  # flow_steps == 0: keep the initialised flow
        best_state, best_nll = flow.state_dict(), trainer.validation_nll(buffer.actions[valid], buffer.states[valid])
    flow.load_state_dict(best_state)
    save_atomic({"flow": best_state, "sizes": flow.describe(), "best_valid_nll": best_nll,
                 "base_distribution": BASE_DISTRIBUTION,
                 "state_mean": torch.from_numpy(buffer.state_mean), "state_std": torch.from_numpy(buffer.state_std)},
                run_dir / "flow.pt")
    return flow
# ---- [end block: flow pretraining] -------------------------------------------------------------------


# ---- Phase 2: RL in the latent space (Algorithm 2) --------------------------------------------------
class NormalLatentCNF:
    """cnf.py's CNF with the Normal-latent flow and its latent policy (unbounded, or clipped to
    a * tanh); the update is cnf.py's line for line. `train(batch)` is one update."""

    def __init__(self, flow: NormalConditionalFlow, state_dim: int, action_dim: int, config: TrainConfig):
        self.flow = flow.freeze()
        self.config = config
        self.actor = LatentPolicy(state_dim, action_dim, config.hidden_dim, config.n_layers, config.latent_clip,
                                  config.amp).to(config.device)
        self.critic = TwinCritic(state_dim, action_dim, config.hidden_dim, config.n_layers, config.amp).to(config.device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=fused)

    # ---- [block: cnf update | copied from cnf.py] ----------------------------------------------------
    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        states, actions, rewards, next_states, dones = batch
        cfg = self.config
        # Eq. 6, critic target: y = r + gamma (1 - d) min_i Q_i'(s', f^-1(z' | s')), z' ~ pi(. | s').
        with torch.no_grad():
            next_actions = self.flow.decode(self.actor(next_states), next_states)
            next_q = self.target_critic(next_states, next_actions).min(0).values  # [B, 1]
            target = rewards + cfg.gamma * (1.0 - dones) * next_q
        q = self.critic(states, actions)  # [2, B, 1]
        critic_loss = ((q - target) ** 2).mean(dim=(1, 2)).sum()  # MSE of Q1 plus MSE of Q2
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        # The policy's action, decoded through the frozen flow with gradients to the policy.
        policy_actions = self.flow.decode(self.actor(states), states)  # [B, act_dim]
        # Eq. 7, advantage A(s, a) = Q(s, a) - Q(s, f^-1(z | s)), Q = min(Q1, Q2), with the updated
        # critics, both actions in one batched pass.
        with torch.no_grad():
            both = self.critic(torch.cat([states, states]), torch.cat([actions, policy_actions]))
            q_data, q_policy = both.min(0).values.chunk(2)  # [B, 1] each
            weights = torch.exp((q_data - q_policy) / cfg.awac_lambda).clamp(max=cfg.exp_adv_max)
        # Eq. 8, policy loss: advantage-weighted L1 distance between data and decoded actions.
        actor_loss = (weights * (actions - policy_actions).abs()).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        with torch.no_grad():  # Polyak averaging of the target critics, one fused op
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), cfg.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(),
                "q_mean": q.detach().mean(), "adv_weight_mean": weights.mean()}
    # ---- [end block: cnf update] ---------------------------------------------------------------------

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Evaluation: a = f^-1(mu(s) | s), or f^-1(a tanh(mu(s)) | s) with a latent clip."""
        return self.flow.decode(self.actor.deterministic(states), states)

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
    """Both phases, evaluation, checkpoints and results.json; returns the results.json path."""
    from tqdm import trange

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; pass --device cpu")
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    if not (config.latent_clip >= 0.0 and math.isfinite(config.latent_clip)):
        raise SystemExit(f"error: --latent_clip must be 0 (unbounded policy, Fig. 5) or a positive a (Fig. 6), "
                         f"not {config.latent_clip}")
    data = load_offline_data(config)
    probe = data.make_eval_env(1)
    check_eval_env(probe, data)
    probe.close()
    run_dir = make_run_dir(config, data.name)
    checkpoint = torch_load(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").exists() else None
    set_seed(config.seed)
    buffer = ReplayBuffer(data, config.device)
    logger = RunLogger(config, run_dir)
    started = time.time()

    if config.flow_checkpoint is not None:
        flow = load_flow(config.flow_checkpoint, buffer, config.device, config.amp)
    elif checkpoint is not None and checkpoint["phase"] == "rl":
        flow = load_flow(str(run_dir / "flow.pt"), buffer, config.device, config.amp)
    else:
        flow = pretrain_flow(config, buffer, run_dir, logger, checkpoint)
        checkpoint = None  # phase 2 starts fresh
    agent = NormalLatentCNF(flow, buffer.states.shape[1], buffer.actions.shape[1], config)

    start, evaluations = 0, []
    if checkpoint is not None and checkpoint["phase"] == "rl":
        agent.load_state_dict(checkpoint["agent"])
        start, evaluations = checkpoint["step"], [tuple(e) for e in checkpoint["evaluations"]]
        set_rng_state(checkpoint["rng"])
    rl_started, update_time = time.time(), 0.0
    for step in trange(start + 1, config.train_steps + 1, desc="phase 2: RL", initial=start,
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
            save_atomic({"phase": "rl", "step": step, "agent": agent.state_dict(), "evaluations": evaluations,
                         "rng": rng_state()}, run_dir / "checkpoint.pt")
    logger.close()
    done = config.train_steps - start
    results = {"algorithm": ALGORITHM, "dataset": data.name, **summarize(evaluations),
               "train_steps": config.train_steps, "latent_clip": config.latent_clip,
               "wall_time_s": time.time() - started,
               "updates_per_s": done / update_time if update_time > 0 else None,
               "rl_wall_time_s": time.time() - rl_started,
               "flow_best_valid_nll": float(torch_load(run_dir / "flow.pt")["best_valid_nll"])
               if (run_dir / "flow.pt").exists() else None}
    return write_results(run_dir, results)


if __name__ == "__main__":
    path = train(parse_config(TrainConfig, sys.argv[1:]))
    print(f"results: {path}")
