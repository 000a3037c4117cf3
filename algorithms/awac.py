"""Advantage Weighted Actor-Critic (AWAC), offline: actor-critic with an advantage-weighted actor update.

Nair, Gupta, Dalal, Levine, "AWAC: Accelerating Online Reinforcement Learning with Offline Datasets"
(arXiv 2006.09359), offline phase only, following CORL's single-file reference (corl-team/CORL,
algorithms/offline/awac.py): the AWAC column of Table 1 and Fig. 4 in Akimov et al. (CNF, arXiv
2211.11096). CNF's phase 2 is an advantage-weighted update of this kind, carried into a flow's latent space.

    python algorithms/awac.py --env halfcheetah-medium-v2 --config_path algorithms/configs/awac/locomotion.yaml
    python algorithms/awac.py --config_path algorithms/configs/awac/hopper-medium-v2.yaml    # CORL's per-dataset values
    python algorithms/awac.py --env maze2d-umaze-v1 --config_path algorithms/configs/awac/maze2d.yaml # d4rl (Docker)
    python algorithms/awac.py --config_path algorithms/configs/awac/quick.yaml              # CPU quick preset
    python algorithms/awac.py --dataset_path FILE.hdf5 --eval_env Hopper-v4                 # any D4RL-format file

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
`--reward_scaling` (default none, as CORL's `normalize_reward: False`) offers CORL's reward
modification: `returns` scales by 1000 / (max episode return - min episode return), `antmaze` shifts
to r - 1 (CORL's antmaze configs). Data sources and state normalisation: see the comment above
`load_offline_data`.

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
- `--amp` (off by default; not in CORL): bfloat16 matmuls in the hidden layers of actor and critics,
  outputs in float32.
- Episode returns for `--reward_scaling returns` come from the true episode boundaries (see
  `converted_episode_returns`), not from CORL's 1000-step windows over the converted data, which
  drift off the boundaries by one row at every dropped timeout row.
- Batches are drawn with torch.randint on the training device (CORL: numpy on the host). Same law.
  CORL's configs set torch.use_deterministic_algorithms; not done here (no effect on the CPU path).
- Checkpoints hold networks, optimizers and target critics (CORL saves only the online networks), so
  `--resume` continues exactly.
- Antmaze: the data block resolves locomotion and maze2d names only; antmaze runs need
  `--dataset_path FILE --eval_env ID` with configs/awac/antmaze.yaml.

Reading order: config, networks, the Gaussian actor, the update (`AWAC.train`), reward scaling, the
loop; then, below one banner, the plumbing every file shares. tests/test_copies.py checks the
`[block: ...]` copies (the actor's Gaussian and the reward scaling are iql.py's).
"""

import copy
import json
import math
import os
import pickle
import random
import re
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

ALGORITHM = "awac"


@dataclass
class TrainConfig:
    # --- AWAC (CORL's awac.py) ---
    hidden_dim: int = 256  # actor and critic width
    n_layers: int = 4  # linear layers in actor and critics (CORL: 3 hidden layers)
    actor_lr: float = 3e-4  # actor learning rate (CORL: one learning_rate for all)
    critic_lr: float = 3e-4  # critic learning rate
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # Polyak rate of the target critics
    awac_lambda: float = 1.0  # temperature of exp(A / lambda) (CORL's configs: 1/3 locomotion, 0.1 maze2d, antmaze)
    exp_adv_max: float = 100.0  # clamp of the advantage weights
    log_std_min: float = -20.0  # lower clamp of the actor's log-std
    log_std_max: float = 2.0  # upper clamp of the log-std
    reward_scaling: str = "none"  # none | returns (r * 1000 / (max - min episode return)) | antmaze (r - 1) | auto
    train_steps: int = 1_000_000  # gradient updates (CORL: 1M)
    batch_size: int = 256  # batch size (CORL; the CNF paper's grid for CNF: {256, 512, 1024}; maze2d 10240)
    eval_every: int = 5_000  # updates between evaluations (CORL's AWAC: 1000; the CNF paper's protocol: 5000)
    # ---- [block: experiment config | copied from cnf.py] -------------------------------------------
    env: str = "halfcheetah-medium-gymv5"  # D4RL name (halfcheetah-medium-v2, ...) or bundled dataset name
    dataset_path: Optional[str] = None  # any D4RL-format HDF5 file; overrides --env
    eval_env: Optional[str] = None  # Gymnasium id to evaluate in (default: from the data source)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # torch device
    cpu_threads: Optional[int] = None  # torch CPU threads (default: torch's, one per core)
    seed: int = 0  # seeds python, numpy, torch and the evaluation envs
    eval_episodes: int = 10  # episodes per evaluation, stepped together in a vector env
    log_every: int = 1_000  # updates between logged losses (the only host syncs of the loop)
    checkpoint_every: Optional[int] = None  # updates between checkpoints (default: at every evaluation)
    amp: bool = False  # bfloat16 matmuls in hidden layers (CPU AMX / GPU tensor cores); outputs stay float32
    compile: bool = False  # torch.compile the update (on CUDA also captured as CUDA graphs); same maths
    checkpoints_path: str = "runs"  # run directories are created here
    run_name: Optional[str] = None  # run directory name (default: <algo>-<env>-seed<seed>-<time>)
    resume: Optional[str] = None  # RUN_DIR of a stopped run: continue from its last checkpoint
    config_path: Optional[str] = None  # YAML (pyrallis) with values for any field; flags override it
    wandb_mode: str = "offline"  # online | offline | disabled
    wandb_project: str = "cnf"  # wandb project
    # ---- [end block: experiment config] ------------------------------------------------------------


# %% Networks: the MLPs and twin critics every file shares, then the Gaussian actor
# ---- [block: networks | copied from cnf.py] --------------------------------------------------------
# ---- [block: mlp] --------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden: int, n_layers: int, activation=nn.ReLU) -> nn.Sequential:
    """n_layers linear layers with `activation` between them."""
    dims = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
    layers: List[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers.append(activation())
    return nn.Sequential(*layers)
# ---- [end block: mlp] ----------------------------------------------------------------------------


# ---- [block: vectorized linear] ------------------------------------------------------------------
class VectorizedLinear(nn.Module):
    """`ensemble` independent linear layers applied in one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, in_dim: int, out_dim: int, ensemble: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(ensemble, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)
# ---- [end block: vectorized linear] --------------------------------------------------------------


class TwinCritic(nn.Module):
    """Q1 and Q2 (n_layers x hidden, ReLU) as one vectorised ensemble: Q(s, a) -> [2, B, 1] (float32).
    With `amp` only the hidden layers run in bfloat16: the output layer stays float32, because bf16's
    grid at Q ~ 400 is 2, which would round the advantages Q(s, a) - Q(s, a') taken from these values."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, n_layers: int, amp: bool = False):
        super().__init__()
        self.amp = amp  # bfloat16 matmuls in the hidden layers
        dims = [state_dim + action_dim] + [hidden] * (n_layers - 1) + [1]
        layers: List[nn.Module] = []
        for i in range(n_layers):
            layers.append(VectorizedLinear(dims[i], dims[i + 1], ensemble=2))
            if i < n_layers - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([states, actions], dim=-1).unsqueeze(0).expand(2, -1, -1)
        *hidden_layers, output_layer = self.net
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for layer in hidden_layers:
                x = layer(x)
        return output_layer(x.float())
# ---- [end block: networks] -------------------------------------------------------------------------


# ---- [block: gaussian policy | copied from iql.py] -------------------------------------------------
def normal_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, diag(exp(log_std))^2), summed over action dimensions: [B, act_dim] -> [B, 1]."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std).sum(-1, keepdim=True) - 0.5 * actions.shape[-1] * math.log(2.0 * math.pi)


class GaussianPolicy(nn.Module):
    """pi(a | s) = N(mu(s), sigma^2), log sigma a learned state-independent vector (init 0) clamped to
    [log_std_min, log_std_max]. mu(s) = tanh(MLP(s)) with `tanh_mean` (CORL's IQL GaussianPolicy),
    MLP(s) without (CORL's AWAC Actor). With `amp`, the MLP's matmuls run in bfloat16."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, n_layers: int, log_std_min: float,
                 log_std_max: float, tanh_mean: bool, amp: bool = False):
        super().__init__()
        self.net, self.tanh_mean, self.amp = mlp(state_dim, action_dim, hidden, n_layers), tanh_mean, amp
        self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def mean(self, states: torch.Tensor) -> torch.Tensor:
        """mu(s): [B, act_dim], float32."""
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            mean = self.net(states).float()
        return torch.tanh(mean) if self.tanh_mean else mean

    def clamped_log_std(self) -> torch.Tensor:
        return self.log_std.clamp(self.log_std_min, self.log_std_max)

    def log_prob(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a | s): [B, 1]."""
        return normal_log_prob(actions, self.mean(states), self.clamped_log_std())
# ---- [end block: gaussian policy] ------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, states: torch.Tensor) -> torch.Tensor:
        """a ~ pi(. | s), clamped to the action box [-1, 1] (CORL)."""
        mean = self.mean(states)
        return (mean + self.clamped_log_std().exp() * torch.randn_like(mean)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def deterministic(self, states: torch.Tensor) -> torch.Tensor:
        """Acting: the mean, clamped to the action box."""
        return self.mean(states).clamp(-1.0, 1.0)


# %% The update: twin critics, then the advantage-weighted actor (AWAC's weighted maximum likelihood)
def advantage_weights(advantages: torch.Tensor, awac_lambda: float, max_weight: float) -> torch.Tensor:
    """exp(A / lambda), clamped at max_weight (CORL: 100)."""
    return torch.exp(advantages / awac_lambda).clamp(max=max_weight)


class AWAC:
    """Gaussian actor and twin critics with target critics; `train(batch)` is one update (steps 1-3 above)."""

    def __init__(self, state_dim: int, action_dim: int, config: TrainConfig):
        self.config = config
        self.actor = GaussianPolicy(state_dim, action_dim, config.hidden_dim, config.n_layers, config.log_std_min,
                                    config.log_std_max, tanh_mean=False, amp=config.amp)  # CORL: unsquashed mean
        self.actor.to(config.device)
        # ---- [block: critics and optimizers | copied from cnf.py] ----------------------------------
        self.critic = TwinCritic(state_dim, action_dim, config.hidden_dim, config.n_layers, config.amp)
        self.critic.to(config.device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=fused)
        # ---- [end block: critics and optimizers] ---------------------------------------------------

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        states, actions, rewards, next_states, dones = batch
        cfg = self.config
        # 1. Critics: y = r + gamma (1 - d) min_j Q_j'(s', a'), a' ~ pi(. | s').
        with torch.no_grad():
            next_q = self.target_critic(next_states, self.actor.sample(next_states)).min(0).values  # [B, 1]
            # ---- [block: critic step | copied from cnf.py] ----
            target = rewards + cfg.gamma * (1.0 - dones) * next_q
        q = self.critic(states, actions)  # [2, B, 1]
        critic_loss = ((q - target) ** 2).mean(dim=(-2, -1)).sum(0)  # MSE of Q1 plus MSE of Q2
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.sum().backward()
        self.critic_optimizer.step()
            # ---- [end block: critic step] ----

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

    # ---- [block: agent state | copied from cnf.py] -------------------------------------------------
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
    # ---- [end block: agent state] ------------------------------------------------------------------


# %% Reward scaling (CORL's modify_reward; off by default)
# ---- [block: reward scaling | copied from iql.py] --------------------------------------------------
REWARD_SCALINGS = ("auto", "returns", "antmaze", "none")
LOCOMOTION_NAME = re.compile(r"^(halfcheetah|hopper|walker2d)", re.IGNORECASE)
ANTMAZE_NAME = re.compile(r"ant_?maze", re.IGNORECASE)


def converted_episode_returns(data: "OfflineData") -> np.ndarray:
    """The return of every episode of the converted data. An episode ends at a terminal transition, or
    where the next transition does not start from this one's next observation (a timeout row that the
    q-learning conversion dropped, or the end of the file): the boundaries the file's terminals and
    timeouts set. The last episode counts even if the file cuts it."""
    ends = data.dones > 0
    ends[:-1] |= (data.next_observations[:-1] != data.observations[1:]).any(axis=1)
    ends[-1] = True
    starts = np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1])
    return np.add.reduceat(data.rewards.astype(np.float64), starts)


def scale_rewards(data: "OfflineData", scaling: str) -> Tuple["OfflineData", dict]:
    """CORL's reward modification, as r' = scale * r + shift: `returns` scale = 1000 / (max - min
    episode return) (locomotion), `antmaze` shift = -1, `none`; `auto` picks by the dataset's name."""
    if scaling not in REWARD_SCALINGS:
        raise SystemExit(f"error: --reward_scaling must be one of {', '.join(REWARD_SCALINGS)}, not {scaling!r}")
    if scaling == "auto":
        locomotion, antmaze = LOCOMOTION_NAME.match(data.name), ANTMAZE_NAME.search(data.name)
        scaling = "returns" if locomotion else "antmaze" if antmaze else "none"
    scale, shift = 1.0, 0.0
    if scaling == "returns":
        returns = converted_episode_returns(data)
        if returns.max() - returns.min() <= 0:
            raise SystemExit(f"error: --reward_scaling returns needs episodes with different returns; {data.name} "
                             f"has {len(returns)} episode(s) all returning {returns.max():.4g}: "
                             f"pass --reward_scaling none")
        scale = 1000.0 / float(returns.max() - returns.min())
    elif scaling == "antmaze":
        shift = -1.0
    rewards = (scale * data.rewards + shift).astype(np.float32)
    return replace(data, rewards=rewards), {"reward_scaling": scaling, "reward_scale": scale, "reward_shift": shift}
# ---- [end block: reward scaling] -------------------------------------------------------------------


# %% The loop
# ---- [block: rl loop | copied from cnf.py] ---------------------------------------------------------
def train_agent(agent, buffer: "ReplayBuffer", run: "Run", checkpoint: Optional[dict], desc: str,
                diagnose: Optional[Callable[[int], Dict[str, float]]] = None) -> dict:
    """The offline RL loop: one `agent.train(batch)` per step; losses read every `log_every` steps
    (the loop's only host syncs); every `eval_every` steps an evaluation and a checkpoint, from which
    --resume continues exactly (same batches, same noise). `diagnose(step)` (the flow scripts'
    BehaviourLikelihood) runs after each evaluation; its scalars are logged at the evaluation's step."""
    from tqdm import trange

    config = run.config
    start, evaluations, update_time = 0, [], 0.0
    if checkpoint is not None and checkpoint["phase"] == "rl":
        agent.load_state_dict(checkpoint["agent"])
        start, evaluations = checkpoint["step"], [tuple(e) for e in checkpoint["evaluations"]]
        update_time = checkpoint["update_time_s"]
        set_rng_state(checkpoint["rng"])
    run.phase = "rl"
    update = compiled(lambda: agent.train(buffer.sample(config.batch_size)), config)
    for step in trange(start + 1, config.train_steps + 1, desc=desc, initial=start, total=config.train_steps,
                       mininterval=5):
        run.step = step
        tick = time.perf_counter()
        metrics = update()
        update_time += time.perf_counter() - tick
        if step % config.log_every == 0:
            run.logger.log({k: v.item() for k, v in metrics.items()}, step)
        if step % config.eval_every == 0 or step == config.train_steps:
            evaluations.append((step, run.evaluate(agent.act, buffer)))
            if diagnose is not None:
                run.logger.log(diagnose(step), step)
        if step % (config.checkpoint_every or config.eval_every) == 0 or step == config.train_steps:
            run.save_checkpoint({"agent": agent.state_dict(), "evaluations": evaluations, "update_time_s": update_time})
    return {**summarize(evaluations), "updates_per_s": config.train_steps / update_time if update_time > 0 else None}
# ---- [end block: rl loop] --------------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    """Rewards (optionally) scaled, then AWAC's updates, evaluations, checkpoints; returns the results.json path."""
    data, reward_info = scale_rewards(load_offline_data(config), config.reward_scaling)
    run = start_run(config, data)
    buffer = ReplayBuffer(data, config.device)
    agent = AWAC(buffer.states.shape[1], buffer.actions.shape[1], config)
    results = train_agent(agent, buffer, run, run.checkpoint, desc="AWAC")
    return finish_run(run, {**results, **reward_info})


# ==== Plumbing shared by every algorithm file (copied from cnf.py; tests/test_copies.py keeps it identical) ====
# Nothing below is part of the algorithm: data sources, evaluation, checkpoints, logging, config parsing.


# ---- [block: d4rl names | copied from cnf.py] ------------------------------------------------------
D4RL_LOCOMOTION = re.compile(r"^(halfcheetah|hopper|walker2d)-"
                             r"(random|medium|medium-replay|medium-expert|expert|full-replay)-v2$")
D4RL_MAZE2D = re.compile(r"^maze2d-(umaze|medium|large)-v1$")


def d4rl_filename(name: str) -> str:
    """The file name d4rl caches a dataset under (the basename of its URL)."""
    if D4RL_MAZE2D.match(name):
        return name.replace("-v1", "-sparse-v1") + ".hdf5"
    env, level = name[: -len("-v2")].split("-", 1)
    return f"{env}_{level.replace('-', '_')}-v2.hdf5"
# ---- [end block: d4rl names] -----------------------------------------------------------------------


# ---- [block: d4rl scores | copied from cnf.py] -----------------------------------------------------
D4RL_REF_SCORES = {  # D4RL's (random, expert) returns: normalised score = 100 (R - min) / (max - min)
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3),
    "maze2d-umaze": (23.85, 161.86), "maze2d-medium": (13.13, 277.39), "maze2d-large": (6.7, 273.99),
}
GYMNASIUM_IDS = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
# ---- [end block: d4rl scores] ----------------------------------------------------------------------


# ---- [block: data | copied from cnf.py] ------------------------------------------------------------
# Data sources (`--env`, `--dataset_path`), in the order they are tried:
# 1. `--dataset_path FILE`: any D4RL-format HDF5 file; evaluation env from `--eval_env` or from the
#    file's `env` attribute; scores normalised with the file's `ref_min_score`/`ref_max_score`
#    attributes (or D4RL's table when the file name is a D4RL one).
# 2. `--env <d4rl name>` with d4rl importable (the Docker image): `gym.make(name).get_dataset()`,
#    evaluation in d4rl's own env, `d4rl.get_normalized_score`.
# 3. `--env <d4rl name>` without d4rl: the HDF5 file d4rl would have cached, read from
#    `$D4RL_DATASET_DIR` (default ~/.d4rl/datasets; get it with `python data/download_d4rl.py NAME`),
#    evaluated in Gymnasium's *v4* MuJoCo env: the v2 files were collected with gym's v2 classes, and
#    v4 is the modern env with the same observations, rewards and termination (v5 changes Hopper's
#    terminal reward and Walker2d's foot friction). maze2d has no Gymnasium twin: it needs d4rl.
# 4. `--env <bundled name>` (`<env>-<level>-gymv5`, default `halfcheetah-medium-gymv5`): a dataset
#    generated by data/generate.py from a policy shipped in data/policies/, into `$CNF_DATA_DIR`
#    (default ~/.cache/cnf/datasets) on first use, then reused.
# 5. `--env <Minari id>` (`mujoco/halfcheetah/medium-v0`, ...: any id with a '/'): a dataset in local
#    Minari storage (`$MINARI_DATASETS_PATH`, default ~/.minari/datasets), read offline with `minari`;
#    episodes become D4RL's layout (terminations -> terminals, truncations -> timeouts), evaluation
#    runs in the dataset's own env (`recover_environment(eval_env=True)`), scores are Minari's
#    normalised scores where the dataset has reference scores, else raw returns (results.json says which).
BUNDLED = re.compile(r"^(halfcheetah|hopper|walker2d)-(random|medium|medium-replay|expert|medium-expert)-gymv5$")
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
    dataset_score: Optional[float] = None  # mean normalised return of the data's whole episodes
    score: str = "normalized: 100 (R - random) / (expert - random), D4RL's reference returns"


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


def episode_returns(raw: Dict[str, np.ndarray]) -> np.ndarray:
    """Returns of the data's whole episodes (those that end with a terminal or a timeout row)."""
    ends = np.flatnonzero(np.asarray(raw["terminals"], bool) | np.asarray(raw["timeouts"], bool))
    sums = np.add.reduceat(np.asarray(raw["rewards"], np.float64), np.r_[0, ends[:-1] + 1]) if len(ends) else []
    return np.asarray(sums, dtype=np.float64)


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


def quiet_mujoco() -> None:
    """MuJoCo prints a deprecation of HalfCheetah's XML (`settotalmass`) at every model load: drop that
    one message; every other MuJoCo warning goes on to Python's warnings."""
    try:
        import mujoco
    except ImportError:
        return

    def forward(message: str) -> None:
        if "settotalmass" not in message:
            warnings.warn(f"MuJoCo: {message}")

    mujoco.set_mju_user_warning(forward)


def gymnasium_vector_env(env_id: str) -> Callable[[int], object]:
    def make(num_envs: int):
        import gymnasium

        quiet_mujoco()
        with warnings.catch_warnings():  # MuJoCo envs warn about deprecated model setters at every make
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return gymnasium.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
            except gymnasium.error.Error as e:
                raise SystemExit(f"error: cannot make the evaluation env {env_id!r} ({e}); pass a Gymnasium id "
                                 f"that is installed with --eval_env (e.g. HalfCheetah-v5, Hopper-v4)") from None

    return make


def reference_normalizer(low: float, high: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda returns: 100.0 * (np.asarray(returns) - low) / (high - low)


def bundled_names() -> List[str]:
    """The generated datasets this checkout can build: one per level with a shipped policy."""
    names = []
    for env in GYMNASIUM_IDS:
        shipped = {level for level in ("medium", "medium-replay", "expert")
                   if (REPO_ROOT / "data" / "policies" / f"{env}-{level}.{'hdf5' if 'replay' in level else 'pt'}")
                   .exists()}
        levels = ["random", *sorted(shipped)] + (["medium-expert"] if {"medium", "expert"} <= shipped else [])
        names += [f"{env}-{level}-gymv5" for level in levels]
    return names


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


def data_from_file(config) -> tuple:
    """Source 1: any D4RL-format HDF5 file."""
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
    return name, raw, gymnasium_vector_env(str(eval_env)), reference_normalizer(low, high)


def data_from_d4rl(config) -> tuple:
    """Source 2: d4rl's own loader, env and score (the Docker image)."""
    import d4rl
    import gym

    name = config.env

    def make_env(num_envs: int):
        return gym.vector.SyncVectorEnv([lambda: gym.make(name)] * num_envs)

    def normalize(returns: np.ndarray) -> np.ndarray:
        return 100.0 * np.asarray([d4rl.get_normalized_score(name, r) for r in np.atleast_1d(returns)])

    return name, gym.make(name).get_dataset(), make_env, normalize


def data_from_d4rl_file(config) -> tuple:
    """Source 3: the HDF5 file d4rl would have cached, evaluated in Gymnasium's v4 env."""
    name = config.env
    if D4RL_MAZE2D.match(name):
        raise SystemExit(f"error: {name} needs d4rl (maze2d has no Gymnasium equivalent): use the Docker image")
    path = Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets")) / d4rl_filename(name)
    if not path.exists():
        raise SystemExit(f"error: d4rl is not installed and {path} does not exist; "
                         f"run: python data/download_d4rl.py {name}")
    raw = read_hdf5(str(path))
    raw.pop("attrs")
    env_key = name.split("-")[0]
    return (name, raw, gymnasium_vector_env(config.eval_env or f"{GYMNASIUM_IDS[env_key]}-v4"),
            reference_normalizer(*D4RL_REF_SCORES[env_key]))


def data_from_bundle(config) -> tuple:
    """Source 4: a dataset generated by data/generate.py from a shipped policy."""
    raw = read_hdf5(bundled_dataset_path(config.env))
    attrs = raw.pop("attrs")
    return (config.env, raw, gymnasium_vector_env(config.eval_env or str(attrs["env"])),
            reference_normalizer(float(attrs["ref_min_score"]), float(attrs["ref_max_score"])))


MINARI_ID = re.compile(r"^[\w.-]+(/[\w.-]+)*/[\w.-]+-v\d+$")


def data_from_minari(config) -> tuple:
    """Source 5: a Minari dataset from local storage (no download)."""
    import minari

    try:
        dataset = minari.load_dataset(config.env, download=False)
    except FileNotFoundError:
        raise SystemExit(f"error: the Minari dataset {config.env} is not in local storage (MINARI_DATASETS_PATH "
                         f"or ~/.minari/datasets); get it with: minari download {config.env}") from None
    episodes = list(dataset.iterate_episodes())
    raw = {key: np.concatenate([getattr(e, attr)[: len(e.actions)] for e in episodes])
           for key, attr in [("observations", "observations"), ("actions", "actions"), ("rewards", "rewards"),
                             ("terminals", "terminations"), ("timeouts", "truncations")]}
    raw["timeouts"] = raw["timeouts"] & ~raw["terminals"]  # ended by the time limit only: no done flag

    def make_env(num_envs: int):
        import gymnasium

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return gymnasium.vector.SyncVectorEnv([lambda: dataset.recover_environment(eval_env=True)] * num_envs)

    if "ref_min_score" in dataset.storage.metadata:  # what minari.get_normalized_score uses, x 100
        normalize = lambda returns: 100.0 * minari.get_normalized_score(dataset, np.asarray(returns))  # noqa: E731
    else:
        normalize = np.asarray
    return config.env, raw, make_env, normalize


def d4rl_installed() -> bool:
    try:
        import d4rl  # noqa: F401  (registers the D4RL envs)
        import gym  # noqa: F401
    except ImportError:
        return False
    return True


def data_source(config) -> Callable:
    """The resolver for --dataset_path / --env; an unknown name is refused before anything is loaded."""
    if config.dataset_path is not None:
        return data_from_file
    if D4RL_LOCOMOTION.match(config.env) or D4RL_MAZE2D.match(config.env):
        return data_from_d4rl if d4rl_installed() else data_from_d4rl_file
    if config.env in bundled_names():
        return data_from_bundle
    if MINARI_ID.match(config.env):
        return data_from_minari
    raise SystemExit(f"error: unknown --env {config.env!r}; use a D4RL name (e.g. halfcheetah-medium-v2, "
                     f"maze2d-umaze-v1), a bundled one ({', '.join(bundled_names())}), a Minari id "
                     f"(e.g. mujoco/halfcheetah/medium-v0), or --dataset_path FILE")


def load_offline_data(config) -> OfflineData:
    """Resolve --dataset_path / --env to transitions, an evaluation env and a score normaliser."""
    name, raw, make_env, normalize = data_source(config)(config)
    raw = check_dataset(raw, config.dataset_path or name)
    returns = episode_returns(raw)
    data = qlearning_dataset(raw)
    if len(data["rewards"]) < 2:
        raise SystemExit(f"error: {config.dataset_path or name} holds {len(data['rewards'])} transition(s) "
                         f"after dropping timeout rows; a dataset needs at least 2")
    score = float(np.mean(normalize(returns))) if len(returns) else None
    kind = {} if normalize is not np.asarray else {"score": "raw episode return (the data has no reference scores)"}
    return OfflineData(name=name, make_eval_env=make_env, normalize_score=normalize, dataset_score=score, **kind,
                       **data)


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


# ---- [block: evaluation | copied from cnf.py] ------------------------------------------------------
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


# ---- [block: utilities | copied from cnf.py] -------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state, in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
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
    """A checkpoint or weights file; an unreadable one is one error line that names it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: {path} is unreadable ({str(e).splitlines()[0][:120]}); it is truncated or not "
                         f"a file this script wrote: delete it (and pass the run's flags again to start over) "
                         f"or point to another file") from None


def compiled(step: Callable, config) -> Callable:
    """`--compile`: `step` (a whole update: sampling, forward, backward, optimiser steps) through
    torch.compile; on CUDA in mode reduce-overhead, which replays it as CUDA graphs, so an update costs
    a few graph launches instead of one launch per operator. Random draws inside stay fresh at every
    replay (Inductor threads the RNG state through the graph). The maths is the eager update's."""
    if not config.compile:
        return step
    return torch.compile(step, mode="reduce-overhead" if torch.device(config.device).type == "cuda" else None)


def phase_rank(phase: str) -> int:
    """Pre-training phases (flow, vae, ...) come before the RL phase."""
    return 1 if phase == "rl" else 0


class RunLogger:
    """metrics.jsonl in the run directory (so curves never need wandb) plus wandb, offline by default.
    Each phase has its own step axis in wandb (`flow_step`, `rl_step`, ...), so nothing is dropped
    when phase 2 starts again at step 1. On --resume, lines past the checkpoint are dropped first."""

    def __init__(self, config, run_dir: Path, checkpoint: Optional[dict]):
        path = run_dir / "metrics.jsonl"
        if path.exists():  # keep what the checkpoint covers; the resumed run logs the rest again
            keep = []
            if checkpoint is not None:
                last = (phase_rank(checkpoint["phase"]), checkpoint["step"])
                for line in path.read_text().splitlines():
                    row = json.loads(line)
                    if (phase_rank(row.get("phase", "rl")), row["step"]) <= last:
                        keep.append(line + "\n")
            tmp = run_dir / ".metrics.jsonl.tmp"
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
        self.file, self.axes, self.wandb = open(path, "a"), set(), None
        if config.wandb_mode == "disabled":  # wandb is not even imported
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb.init(project=config.wandb_project, group=f"{ALGORITHM}-{config.env}",
                                name=run_dir.name, config=asdict(config), dir=str(run_dir),
                                mode=config.wandb_mode, resume="allow", id=run_dir.name.replace("/", "_"),
                                settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics: Dict[str, float], step: int, phase: str = "rl") -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "phase": phase, **metrics}) + "\n")
        self.file.flush()
        if self.wandb is None:
            return
        axis = f"{phase}_step"
        for key in metrics.keys() - self.axes:
            self.wandb.define_metric(key, step_metric=axis)
            self.axes.add(key)
        self.wandb.log({**metrics, axis: step})

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def config_path_argument(argv: List[str]) -> Optional[str]:
    """The value of --config_path in either form tyro accepts (`--config_path F`, `--config_path=F`)."""
    for i, arg in enumerate(argv):
        if arg in ("--config_path", "--config-path"):
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise SystemExit("error: --config_path needs a value: a YAML file "
                                 "(e.g. algorithms/configs/cnf/quick.yaml)")
            return argv[i + 1]
        if arg.startswith(("--config_path=", "--config-path=")):
            return arg.split("=", 1)[1]
    return None


def load_yaml_config(config_class, path: str, flag: str):
    """A pyrallis YAML as a config; unknown keys and malformed files are one error line each."""
    import pyrallis
    import yaml

    if not os.path.isfile(path):
        raise SystemExit(f"error: {flag} {path} does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"error: {flag} {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    fields = set(config_class.__dataclass_fields__)
    if not isinstance(values, dict) or set(values) - fields:
        unknown = sorted(set(values) - fields) if isinstance(values, dict) else values
        raise SystemExit(f"error: {flag} {path}: unknown keys {unknown}; valid keys are the flags of --help")
    try:
        with open(path) as f:
            return pyrallis.load(config_class, f)
    except Exception as e:  # pyrallis' own type errors (a string where a number belongs, ...)
        raise SystemExit(f"error: {flag} {path}: {str(e).splitlines()[0]}") from None


def check_config(config) -> None:
    """Every setting, before any data is loaded: one `error:` line that names the setting and what
    is allowed. Rules go by the field's name, so every algorithm file's fields are covered."""
    def refuse(name: str, allowed: str) -> None:
        raise SystemExit(f"error: --{name} {getattr(config, name)!r} is not allowed: {allowed}")

    for name, value in asdict(config).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name == "train_steps" and value < 1:
            refuse(name, "at least 1 update")
        elif name.endswith(("_steps", "_patience")) and value < 0:
            refuse(name, "0 or more")
        elif name.endswith(("_every", "_episodes", "batch_size", "_layers", "_hidden", "hidden_dim",
                            "cpu_threads")) and value < 1:
            refuse(name, "a whole number, at least 1")
        elif name.endswith("_fraction") and not 0.0 < value < 1.0:
            refuse(name, "a fraction strictly between 0 and 1")
        elif name.endswith("_lr") and not value > 0.0:
            refuse(name, "a positive learning rate")
        elif name in ("gamma", "tau") and not 0.0 < value <= 1.0:
            refuse(name, "a number in (0, 1]")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        refuse("device", "cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; pass --device cpu")
    if config.wandb_mode not in ("online", "offline", "disabled"):
        refuse("wandb_mode", "online, offline or disabled")
    for name in ("dataset_path", "flow_checkpoint", "vae_checkpoint"):
        if getattr(config, name, None) is not None and not os.path.isfile(getattr(config, name)):
            raise SystemExit(f"error: --{name} {getattr(config, name)} does not exist")
    data_source(config)  # an unknown --env is refused here, before any data is read


def parse_config(config_class, argv: List[str]):
    """tyro flags over an optional pyrallis YAML (--config_path): flags win over the file.
    A --resume run starts from its own config.yaml (flags may still change it)."""
    import tyro

    default, path = config_class(), config_path_argument(argv)
    if path is not None:
        default = load_yaml_config(config_class, path, "--config_path")
    config = tyro.cli(config_class, args=argv, default=default, use_underscores=True)
    if config.resume is not None:
        saved = Path(config.resume) / "config.yaml"
        if not saved.is_file():
            raise SystemExit(f"error: --resume {config.resume} is not a run directory (no config.yaml)")
        config = tyro.cli(config_class, args=argv, default=load_yaml_config(config_class, str(saved), "--resume"),
                          use_underscores=True)
    check_config(config)
    return config


def make_run_dir(config, data_name: str) -> Path:
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


def write_json_atomic(path: Path, obj: dict) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
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


@dataclass
class Run:
    """One run directory while it trains: its config, data, checkpoint, logger and clocks.
    `elapsed()` counts the wall time of every part of a resumed run; status.json says whether the
    run is running, finished, interrupted or failed (a killed run stays 'running' with a dead pid)."""

    config: object
    data: OfflineData
    dir: Path
    checkpoint: Optional[dict]
    logger: RunLogger
    started: float
    phase: str = "start"
    step: int = 0
    active = None  # the run in progress, for the Ctrl-C message

    def elapsed(self) -> float:
        return time.time() - self.started

    def set_status(self, state: str) -> None:
        write_json_atomic(self.dir / "status.json", {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                                                     "phase": self.phase, "step": self.step, "updated": time.time()})

    def save_checkpoint(self, state: dict) -> None:
        """Atomic checkpoint.pt with the RNG state and the run's wall time so far."""
        save_atomic({**state, "phase": self.phase, "step": self.step, "rng": rng_state(),
                     "elapsed_s": self.elapsed()}, self.dir / "checkpoint.pt")
        self.set_status("running")

    def note(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message)

    def evaluate(self, act: Callable[[torch.Tensor], torch.Tensor], buffer: "ReplayBuffer") -> float:
        """Evaluation episodes, logged and printed on one line; returns the normalised score."""
        config, data = self.config, self.data
        returns = evaluate(data.make_eval_env, act, buffer.state_mean, buffer.state_std, config.eval_episodes,
                           config.seed, config.device)
        score = float(np.mean(data.normalize_score(returns)))
        self.logger.log({"eval/normalized_score": score, "eval/return": float(returns.mean())}, step=self.step)
        reference = f"  (dataset average {data.dataset_score:.1f})" if data.dataset_score is not None else ""
        self.note(f"step {self.step}  normalized {score:.1f}{reference}")
        return score


def start_run(config, data: OfflineData) -> Run:
    """Check the evaluation env against the data, make (or reopen) the run directory and its
    checkpoint, seed everything and open the logger."""
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    probe = data.make_eval_env(1)
    check_eval_env(probe, data)
    probe.close()
    run_dir = make_run_dir(config, data.name)
    checkpoint = torch_load(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").exists() else None
    set_seed(config.seed)
    logger = RunLogger(config, run_dir, checkpoint)
    run = Run(config, data, run_dir, checkpoint, logger, time.time() - (checkpoint or {}).get("elapsed_s", 0.0))
    run.set_status("running")
    Run.active = run
    return run


def finish_run(run: Run, results: dict) -> Path:
    """results.json (scores, the dataset's own average, wall time of all parts), status 'finished'."""
    run.logger.close()
    config, summary = run.config, results.get("last10_mean_normalized_score")
    results = {"algorithm": ALGORITHM, "dataset": run.data.name, "seed": config.seed, "train_steps": config.train_steps,
               **results, "score": run.data.score, "dataset_normalized_score": run.data.dataset_score,
               "wall_time_s": run.elapsed()}
    path = write_json_atomic(run.dir / "results.json", results)
    run.phase = "done"
    run.set_status("finished")
    Run.active = None
    reference = f" (dataset average {run.data.dataset_score:.1f})" if run.data.dataset_score is not None else ""
    if summary is not None:
        print(f"{ALGORITHM} on {run.data.name}: last-10 mean normalized {summary:.1f}, final "
              f"{results['final_normalized_score']:.1f}{reference}, {results['wall_time_s']:.0f} s")
    return path


def main(train: Callable, config_class) -> None:
    """The command line: parse, train, print the results path. Ctrl-C stops at a safe point: the
    last checkpoint stays, and the message gives the exact command that continues the run."""
    config = parse_config(config_class, sys.argv[1:])
    try:
        path = train(config)
    except KeyboardInterrupt:
        run = Run.active
        if run is None:
            raise SystemExit("interrupted before the run directory existed; nothing to resume") from None
        run.set_status("interrupted")
        print(f"\ninterrupted in {run.phase} at step {run.step}; continue with: "
              f"python {sys.argv[0]} --resume {run.dir}", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException:
        if Run.active is not None:
            Run.active.set_status("failed")
        raise
    print(f"results: {path}")
# ---- [end block: utilities] ------------------------------------------------------------------------


if __name__ == "__main__":
    main(train, TrainConfig)
