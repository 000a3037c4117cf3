"""Implicit Q-Learning (IQL): offline RL that never evaluates an action outside the dataset.

Kostrikov, Nair, Levine, "Offline Reinforcement Learning with Implicit Q-Learning" (arXiv 2110.06169),
following CORL's single-file reference (corl-team/CORL, algorithms/offline/iql.py): the IQL column of
Table 1 and Fig. 4 in Akimov et al. (CNF, arXiv 2211.11096).

    python algorithms/iql.py --env halfcheetah-medium-v2 --config_path algorithms/configs/iql/locomotion.yaml
    python algorithms/iql.py --config_path algorithms/configs/iql/hopper-medium-v2.yaml     # CORL's per-dataset values
    python algorithms/iql.py --env maze2d-umaze-v1 --config_path algorithms/configs/iql/maze2d.yaml  # d4rl (Docker)
    python algorithms/iql.py --config_path algorithms/configs/iql/quick.yaml               # CPU quick preset
    python algorithms/iql.py --dataset_path FILE.hdf5 --eval_env Hopper-v4                  # any D4RL-format file

One update (`IQL.train`, CORL's order): 1. expectile regression of V(s) toward the target critics' Q'(s, a);
2. SARSA-style critics, y = r + gamma (1 - done) V(s'); 3. advantage-weighted policy extraction, the actor's
learning rate cosine-annealed to 0 over train_steps; 4. Polyak averaging of the target critics (tau 0.005).
The policy is CORL's default Gaussian: mean tanh(MLP(s)), a learned state-independent log-std clamped to
[-20, 2]; acting uses the mean; `--deterministic_policy` is CORL's tanh MLP with squared-error regression.
Networks: 2 hidden layers of 256 (ReLU). Rewards (`--reward_scaling`, default auto; CORL's `modify_reward`):
locomotion scaled by 1000 / (max - min episode return), antmaze shifted to r - 1, anything else left alone.

Choices where CORL is silent, and deliberate deviations from it:
- Episode returns for the reward scale follow the data's true episode boundaries (official IQL code); CORL's
  1000-step windows over the converted data drift off them by one row at every timeout row dropped.
- Defaults are CORL's locomotion values, with reward scaling on for every locomotion dataset (IQL paper;
  CORL turns it on only for hopper-medium and -medium-replay, which also use the deterministic policy and
  tau 0.001; hopper-medium-expert uses beta 6, expectile 0.5: configs/iql/<dataset>.yaml).
- Q_1 and Q_2 are one vectorised ensemble (cnf.py's TwinCritic) with one Adam, as CORL's one Adam over
  both; all Adams are fused. The Gaussian log-density is written out (torch.distributions.Normal syncs
  with the host to validate); `train(batch)` returns tensors: no host sync per update. Same values.
- `--amp` (off; not in CORL): bfloat16 matmuls in the hidden layers, outputs in float32. No actor dropout.
- Batches are drawn with torch.randint on the training device (CORL: numpy on the host). Same law.
- Checkpoints hold every network, optimizer, the target critics and the lr schedule: `--resume` is exact.
- Antmaze runs need `--dataset_path FILE --eval_env ID` (configs/iql/antmaze.yaml holds CORL's values).

Reading order: config, networks, policy and value function, the update (`IQL.train`), reward scaling, the loop;
then, below one banner, the plumbing every file shares (data sources: the comment above `load_offline_data`).
What is cnf.py's is copied whole and marked `# Copied from cnf.py: NAME` (tests/test_copies.py keeps the copies
identical); awac.py copies this file's Gaussian policy and reward scaling.
"""

import copy
import functools
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

ALGORITHM = "iql"


@dataclass
class TrainConfig:
    # --- IQL (CORL's iql.py) ---
    hidden_dim: int = 256  # width of policy, critics and value function
    n_layers: int = 3  # linear layers in each (CORL: 2 hidden layers)
    actor_lr: float = 3e-4  # policy learning rate (cosine-annealed to 0 over train_steps)
    critic_lr: float = 3e-4  # Q_1, Q_2 learning rate
    value_lr: float = 3e-4  # V learning rate
    gamma: float = 0.99  # discount
    tau: float = 0.005  # Polyak rate of the target critics
    expectile: float = 0.7  # tau of the value function's expectile regression (antmaze: 0.9)
    beta: float = 3.0  # inverse temperature of the advantage weights exp(beta A) (antmaze: 10)
    exp_adv_max: float = 100.0  # clamp of the advantage weights
    deterministic_policy: bool = False  # tanh-MLP policy with squared-error regression instead of the Gaussian
    log_std_min: float = -20.0  # lower clamp of the Gaussian policy's log-std
    log_std_max: float = 2.0  # upper clamp of the log-std
    reward_scaling: str = "auto"  # auto | returns (r * 1000 / (max - min episode return)) | antmaze (r - 1) | none
    train_steps: int = 1_000_000  # gradient updates (CORL: 1M)
    batch_size: int = 256  # batch size (CORL; the CNF paper's grid for CNF: {256, 512, 1024}; maze2d 10240)
    eval_every: int = 5_000  # updates between evaluations
    # Copied from cnf.py: TrainConfig[experiment]
    # --- experiment: the fields every algorithm file shares ---
    env: str = "halfcheetah-medium-gymv5"  # D4RL name (halfcheetah-medium-v2, ...) or bundled dataset name
    dataset_path: Optional[str] = None  # any D4RL-format HDF5 file; overrides --env
    eval_env: Optional[str] = None  # Gymnasium id to evaluate in (default: from the data source)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # torch device
    cpu_threads: Optional[int] = None  # torch CPU threads (default: torch's, one per core)
    seed: int = 0  # seeds python, numpy, torch and the evaluation envs
    eval_episodes: int = 10  # episodes per evaluation, stepped together in a vector env
    eval_workers: Optional[int] = None  # evaluation processes beside training (0: in it; default 1 with 4+ cores)
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


# %% Networks: the MLPs and twin critics every file shares, the policy and the value function
# Copied from cnf.py: mlp
def mlp(in_dim: int, out_dim: int, hidden: int, n_layers: int, activation=nn.ReLU) -> nn.Sequential:
    """n_layers linear layers with `activation` between them."""
    dims = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
    layers: List[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


# Copied from cnf.py: VectorizedLinear
class VectorizedLinear(nn.Module):
    """`ensemble` independent linear layers applied in one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, in_dim: int, out_dim: int, ensemble: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(ensemble, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


# Copied from cnf.py: TwinCritic
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

    def deterministic(self, states: torch.Tensor) -> torch.Tensor:
        """Acting: the mean, tanh(MLP(s)), inside the action box."""
        return self.mean(states)

    def behavior_cloning_loss(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """-log pi(a | s): [B, 1]."""
        return -self.log_prob(states, actions)


class DeterministicPolicy(nn.Module):
    """a = tanh(MLP(s)), regressed with the squared error summed over action dimensions (CORL's option)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, n_layers: int, amp: bool = False):
        super().__init__()
        self.net, self.amp = mlp(state_dim, action_dim, hidden, n_layers), amp

    def deterministic(self, states: torch.Tensor) -> torch.Tensor:
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            mean = self.net(states).float()
        return torch.tanh(mean)

    def behavior_cloning_loss(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """||pi(s) - a||^2: [B, 1]."""
        return ((self.deterministic(states) - actions) ** 2).sum(-1, keepdim=True)


class ValueFunction(nn.Module):
    """V(s): n_layers linear layers (ReLU), [B, obs_dim] -> [B, 1] (float32). With `amp` only the hidden layers
    run in bfloat16, as the critics': A = Q'(s, a) - V(s) is not taken between two bf16-rounded values."""

    def __init__(self, state_dim: int, hidden: int, n_layers: int, amp: bool = False):
        super().__init__()
        self.net, self.amp = mlp(state_dim, 1, hidden, n_layers), amp

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        *hidden_layers, output_layer = self.net
        x = states
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for layer in hidden_layers:
                x = layer(x)
        return output_layer(x.float())


# %% The update: expectile value regression, SARSA critics, advantage-weighted policy extraction
def expectile_loss(residuals: torch.Tensor, expectile: float) -> torch.Tensor:
    """L_V's asymmetric L2, mean of |tau - 1(u < 0)| u^2: minimised by the tau-expectile of the targets."""
    weight = torch.where(residuals < 0, 1.0 - expectile, expectile)
    return (weight * residuals ** 2).mean()


def advantage_weights(advantages: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """The advantage-weighted-regression weights exp(beta A), clamped at max_weight (CORL: 100)."""
    return torch.exp(beta * advantages).clamp(max=max_weight)


class IQL:
    """Value function, twin critics and policy; `train(batch)` is one update (steps 1-4 of the docstring)."""

    def __init__(self, state_dim: int, action_dim: int, config: TrainConfig):
        self.config = config
        if config.deterministic_policy:
            actor = DeterministicPolicy(state_dim, action_dim, config.hidden_dim, config.n_layers, config.amp)
        else:
            actor = GaussianPolicy(state_dim, action_dim, config.hidden_dim, config.n_layers, config.log_std_min,
                                   config.log_std_max, tanh_mean=True, amp=config.amp)
        self.actor = actor.to(config.device)  # pi(a | s)
        self.critic = TwinCritic(state_dim, action_dim, config.hidden_dim, config.n_layers, config.amp)  # Q_1, Q_2
        self.critic.to(config.device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)  # Q_1', Q_2'
        self.value = ValueFunction(state_dim, config.hidden_dim, config.n_layers, config.amp).to(config.device)
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=config.value_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=fused)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=fused)
        if config.compile:  # a tensor lr: the cosine schedule then changes a value, not the compiled update
            self.actor_optimizer.param_groups[0]["lr"] = torch.tensor(config.actor_lr, device=config.device)
        self.actor_lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_optimizer,
                                                                            max(1, config.train_steps))

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        states, actions, rewards, next_states, dones = batch
        cfg = self.config
        with torch.no_grad():
            next_v = self.value(next_states)  # V(s') before the value step, as CORL
            target_q = self.target_critic(states, actions).min(0).values  # Q'(s, a): [B, 1]
        # 1. Value: L_V = mean(|tau - 1(u < 0)| u^2), u = Q'(s, a) - V(s), Q' = min(Q_1', Q_2').
        v = self.value(states)
        advantages = (target_q - v).detach()  # A = Q'(s, a) - V(s), V before its step
        value_loss = expectile_loss(target_q - v, cfg.expectile)
        self.value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_optimizer.step()

        # 2. Critics: y = r + gamma (1 - d) V(s'); loss = (MSE(Q_1, y) + MSE(Q_2, y)) / 2.
        target = rewards + cfg.gamma * (1.0 - dones) * next_v
        q = self.critic(states, actions)  # [2, B, 1]
        critic_loss = ((q - target) ** 2).mean()
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        # 3. Policy: L_pi = mean(min(exp(beta A), 100) * -log pi(a | s)); the actor lr follows the cosine schedule.
        weights = advantage_weights(advantages, cfg.beta, cfg.exp_adv_max)  # [B, 1]
        actor_loss = (weights * self.actor.behavior_cloning_loss(states, actions)).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        self.actor_lr_schedule.step()

        with torch.no_grad():  # 4. Polyak averaging of the target critics, one fused op
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), cfg.tau)
        return {"value_loss": value_loss.detach(), "critic_loss": critic_loss.detach(), "v_mean": v.detach().mean(),
                "actor_loss": actor_loss.detach(), "q_mean": q.detach().mean(), "adv_weight_mean": weights.mean(),
                "actor_lr": torch.as_tensor(self.actor_optimizer.param_groups[0]["lr"], dtype=torch.float64)}

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Evaluation: the policy's mean, tanh(MLP(s)), inside the action box."""
        return self.actor.deterministic(states)

    PARTS = ("actor", "critic", "target_critic", "value", "actor_optimizer", "critic_optimizer", "value_optimizer",
             "actor_lr_schedule")  # what a checkpoint holds, every one with state_dict / load_state_dict

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in self.PARTS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.PARTS:
            getattr(self, name).load_state_dict(state[name])


# %% Reward scaling (IQL paper Sec. 5; CORL's modify_reward)
REWARD_SCALINGS = ("auto", "returns", "antmaze", "none")
LOCOMOTION_NAME = re.compile(r"^(halfcheetah|hopper|walker2d)", re.IGNORECASE)
ANTMAZE_NAME = re.compile(r"ant_?maze", re.IGNORECASE)


def converted_episode_returns(data: "OfflineData") -> np.ndarray:
    """Every episode's return. An episode ends at a terminal, or where the next transition does not start from
    this one's next observation (a dropped timeout row, the file's end); the last counts even if cut."""
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


# %% The loop
# Copied from cnf.py: train_agent
def train_agent(agent, buffer: "ReplayBuffer", run: "Run", checkpoint: Optional[dict], desc: str,
                diagnose: Optional[Callable[[int], Dict[str, float]]] = None) -> dict:
    """The offline RL loop: one `agent.train(batch)` per step, losses logged every `log_every` steps, an
    evaluation every `eval_every` steps (then `diagnose(step)`, if given), checkpoints from which --resume
    continues exactly (same batches, same noise)."""
    config = run.config
    start, evaluations = run.resume_agent(agent, buffer, checkpoint)
    update = compiled(lambda: agent.train(buffer.sample(config.batch_size)), config)
    for step in run.steps(start, config.train_steps, desc):
        metrics = run.timed(update)
        if step % config.log_every == 0:
            run.logger.log({k: v.item() for k, v in metrics.items()}, step)
        if step % config.eval_every == 0 or step == config.train_steps:
            run.evaluate(agent.act, buffer, evaluations)  # here, or in a worker process (--eval_workers)
            if diagnose is not None:
                run.logger.log(diagnose(step), step)
        run.checkpoint_agent(agent, evaluations)
    return run.agent_results(evaluations)


def train(config: TrainConfig) -> Path:
    """Rewards scaled, then IQL's updates, evaluations and checkpoints; returns the results.json path."""
    data, reward_info = scale_rewards(load_offline_data(config), config.reward_scaling)
    run = start_run(config, data)
    buffer = ReplayBuffer(data, config.device)
    agent = IQL(buffer.states.shape[1], buffer.actions.shape[1], config)
    results = train_agent(agent, buffer, run, run.checkpoint, desc="IQL")
    return finish_run(run, {**results, **reward_info})


# ==== Plumbing shared by every algorithm file (copied from cnf.py; tests/test_copies.py keeps it identical) ====
# Nothing below is part of the algorithm: data sources, evaluation, checkpoints, logging, config parsing.

D4RL_LOCOMOTION = re.compile(r"^(halfcheetah|hopper|walker2d)-"
                             r"(random|medium|medium-replay|medium-expert|expert|full-replay)-v2$")
D4RL_MAZE2D = re.compile(r"^maze2d-(umaze|medium|large)-v1$")
D4RL_REF_SCORES = {  # D4RL's (random, expert) returns: normalised score = 100 (R - min) / (max - min)
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3),
    "maze2d-umaze": (23.85, 161.86), "maze2d-medium": (13.13, 277.39), "maze2d-large": (6.7, 273.99),
}
GYMNASIUM_IDS = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
BUNDLED = re.compile(r"^(halfcheetah|hopper|walker2d)-(random|medium|medium-replay|expert|medium-expert)-gymv5$")
MINARI_ID = re.compile(r"^[\w.-]+(/[\w.-]+)*/[\w.-]+-v\d+$")
REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKS = [  # check_config's rules, by a field's name: (the names, the test a value must pass, what is allowed)
    (("train_steps",), lambda v: v >= 1, "at least 1 update"),
    (("_steps", "_patience", "_workers"), lambda v: v >= 0, "0 or more"),
    (("_every", "_episodes", "batch_size", "_layers", "_hidden", "hidden_dim", "cpu_threads"), lambda v: v >= 1,
     "a whole number, at least 1"),
    (("_fraction",), lambda v: 0.0 < v < 1.0, "a fraction strictly between 0 and 1"),
    (("_lr",), lambda v: v > 0.0, "a positive learning rate"),
    (("gamma", "tau"), lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    (("device",), lambda v: re.fullmatch(r"(cpu|mps|cuda)(:\d+)?", v), "cpu, cuda, cuda:N or mps"),
    (("wandb_mode",), lambda v: v in ("online", "offline", "disabled"), "online, offline or disabled"),
]


def d4rl_filename(name: str) -> str:
    """The file name d4rl caches a dataset under (the basename of its URL)."""
    if D4RL_MAZE2D.match(name):
        return name.replace("-v1", "-sparse-v1") + ".hdf5"
    env, level = name[: -len("-v2")].split("-", 1)
    return f"{env}_{level.replace('-', '_')}-v2.hdf5"


@dataclass
class OfflineData:
    """Transitions after D4RL's q-learning conversion, plus how to evaluate and score on them."""
    name: str
    observations: np.ndarray  # [N, obs_dim] float32
    actions: np.ndarray  # [N, act_dim] float32, inside [-1, 1]
    rewards: np.ndarray  # [N] float32
    next_observations: np.ndarray  # [N, obs_dim] float32
    dones: np.ndarray  # [N] float32, 1 where the episode terminated (not timed out)
    make_eval_env: Callable[[int], object]  # num_envs -> vector env (picklable: workers make their own)
    normalize_score: Callable[[np.ndarray], np.ndarray]  # episode returns -> 100 x normalised
    dataset_score: Optional[float] = None  # mean normalised return of the data's whole episodes
    score: str = "normalized: 100 (R - random) / (expert - random), D4RL's reference returns"


def qlearning_dataset(raw: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """D4RL's `qlearning_dataset`: next observation = the next row; timeout rows and the last row are dropped."""
    keep = np.flatnonzero(~raw["timeouts"][: len(raw["rewards"]) - 1].astype(bool))
    return {"observations": raw["observations"][keep], "actions": raw["actions"][keep], "rewards": raw["rewards"][keep],
            "next_observations": raw["observations"][keep + 1], "dones": raw["terminals"][keep].astype(np.float32)}


def episode_returns(raw: Dict[str, np.ndarray]) -> np.ndarray:
    """Returns of the data's whole episodes (those that end with a terminal or a timeout row)."""
    ends = np.flatnonzero(np.asarray(raw["terminals"], bool) | np.asarray(raw["timeouts"], bool))
    return np.add.reduceat(np.asarray(raw["rewards"], float), np.r_[0, ends[:-1] + 1]) if len(ends) else np.zeros(0)


def read_hdf5(path: str) -> Dict[str, np.ndarray]:
    try:
        with __import__("h5py").File(path, "r") as f:
            keys = ("observations", "actions", "rewards", "terminals", "timeouts")
            if missing := [k for k in keys if k not in f]:
                raise SystemExit(f"error: {path} lacks the D4RL keys {missing}; see data/README.md for the format")
            return {**{k: f[k][:] for k in keys}, "attrs": dict(f.attrs), "path": path}
    except OSError as e:
        raise SystemExit(f"error: {path} is not a readable HDF5 file ({e}); download or generate it again") from None


def check_dataset(raw: Dict[str, np.ndarray], source: str) -> Dict[str, np.ndarray]:
    obs, act, n = np.asarray(raw["observations"]), np.asarray(raw["actions"]), len(raw["observations"])
    if obs.ndim != 2 or act.ndim != 2 or n == 0:
        raise SystemExit(f"error: {source}: observations and actions must be 2-D [N, dim] arrays, "
                         f"got {obs.shape} and {act.shape}")
    if key := next((k for k in ("actions", "rewards", "terminals", "timeouts") if len(raw[k]) != n), None):
        raise SystemExit(f"error: {source}: '{key}' has {len(raw[key])} rows but observations have {n}")
    for key in ("observations", "actions", "rewards"):
        if (bad := ~np.isfinite(np.asarray(raw[key]).reshape(n, -1)).all(axis=1)).any():
            raise SystemExit(f"error: {source}: {bad.sum()} rows of '{key}' hold NaN or inf "
                             f"(first: row {np.flatnonzero(bad)[0]}); remove or repair them")
    if (rows := np.flatnonzero(np.abs(act).max(axis=1) > 1.0 + 1e-4)).size:
        raise SystemExit(f"error: {source}: actions must lie in [-1, 1] (max |a| = {np.abs(act).max():.4g}, row "
                         f"{rows[0]}); rescale them to the env's action box first")
    return {**raw, "observations": obs.astype(np.float32), "actions": np.clip(act, -1.0, 1.0).astype(np.float32),
            "rewards": np.asarray(raw["rewards"], dtype=np.float32)}


def make_vector_env(kind: str, env_id: str, num_envs: int):
    """`num_envs` eval envs in one sync vector env: d4rl's, a Minari dataset's or Gymnasium's (pickled as a partial)."""
    with warnings.catch_warnings():  # MuJoCo envs warn about deprecated model setters at every make
        warnings.simplefilter("ignore", DeprecationWarning)
        if kind == "d4rl":
            import d4rl  # noqa: F401  (registers the D4RL envs)
            import gym
            return gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * num_envs)
        import gymnasium
        if kind == "minari":
            dataset = __import__("minari").load_dataset(env_id, download=False)
            return gymnasium.vector.SyncVectorEnv([lambda: dataset.recover_environment(eval_env=True)] * num_envs)
        if importlib.util.find_spec("mujoco"):  # HalfCheetah's XML warns (`settotalmass`) at every load: drop it
            __import__("mujoco").set_mju_user_warning(lambda m: "settotalmass" in m or warnings.warn(f"MuJoCo: {m}"))
        try:
            return gymnasium.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
        except gymnasium.error.Error as e:
            raise SystemExit(f"error: cannot make the evaluation env {env_id!r} ({e}); pass a Gymnasium id "
                             f"that is installed with --eval_env (e.g. HalfCheetah-v5, Hopper-v4)") from None


def bundled_sources(name: str) -> Optional[List[Path]]:
    """The shipped files a bundled dataset `<env>-<level>-gymv5` is generated from, or None if one is missing."""
    env, level = BUNDLED.match(name).groups() if BUNDLED.match(name) else (None, None)
    files = {"random": [], "medium-expert": ["medium.pt", "expert.pt"]}.get(level, [f"{level}.pt"])
    paths = [REPO_ROOT / "data" / "policies" / f"{env}-{f.replace('replay.pt', 'replay.hdf5')}" for f in files]
    return paths if env and all(p.exists() for p in paths) else None


def bundled_dataset_path(name: str) -> str:
    """$CNF_DATA_DIR/<name>.hdf5 (default ~/.cache/cnf/datasets), generated when missing or stale (policy_sha256)."""
    path = Path(os.environ.get("CNF_DATA_DIR", Path.home() / ".cache" / "cnf" / "datasets")) / f"{name}.hdf5"
    hashes = ",".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in bundled_sources(name))
    if path.exists():
        with __import__("h5py").File(path, "r") as f:
            if f.attrs.get("policy_sha256") in (hashes or "none (uniform random actions)", None):
                return str(path)
        print(f"{path} came from an older shipped policy: generating it again", file=sys.stderr)
    print(f"generating the bundled dataset {name} into {path} (once; later runs reuse it)", file=sys.stderr)
    cmd = [sys.executable, str(REPO_ROOT / "data" / "generate.py"), "--env", f"{GYMNASIUM_IDS[name.split('-')[0]]}-v5",
           "--level", BUNDLED.match(name)[2], "--num_steps", "1000000", "--seed", "0", "--out", str(path)]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"error: could not generate {name}; run {' '.join(cmd[1:])} to see why")
    return str(path)


def data_source(config) -> str:
    """The source (else an error, before any work): `--dataset_path FILE` (env: --eval_env or its `env` attribute),
    a D4RL name (d4rl, else its cached file in Gymnasium's v4 env), a bundled `*-gymv5`, or a Minari id (offline)."""
    if config.dataset_path is not None:
        return "file"
    if D4RL_LOCOMOTION.match(config.env) or D4RL_MAZE2D.match(config.env):
        return "d4rl" if all(importlib.util.find_spec(m) for m in ("d4rl", "gym")) else "d4rl file"
    if bundled_sources(config.env) is not None:
        return "bundle"
    if MINARI_ID.match(config.env):
        return "minari"
    bundled = [n for n in (f"{e}-{level}-gymv5" for e in GYMNASIUM_IDS for level in ("random", "medium",
               "medium-replay", "expert", "medium-expert")) if bundled_sources(n) is not None]
    raise SystemExit(f"error: unknown --env {config.env!r}; use a D4RL name (e.g. halfcheetah-medium-v2, "
                     f"maze2d-umaze-v1), a bundled one ({', '.join(bundled)}), a Minari id "
                     f"(e.g. mujoco/halfcheetah/medium-v0), or --dataset_path FILE")


def read_source(config) -> tuple:
    """(name, raw D4RL-layout arrays, make_eval_env, normalize_score) from the config's data source."""
    source, name = data_source(config), config.env
    if source == "d4rl":  # scored with D4RL's reference returns, as d4rl.get_normalized_score does
        low, high = next(v for k, v in D4RL_REF_SCORES.items() if name.startswith(k))
        import d4rl  # noqa: F401  (registers the D4RL envs)
        return (name, __import__("gym").make(name).get_dataset(), functools.partial(make_vector_env, "d4rl", name),
                lambda returns: 100.0 * (np.asarray(returns) - low) / (high - low))
    if source == "minari":
        import minari
        try:
            dataset = minari.load_dataset(name, download=False)
        except FileNotFoundError:
            raise SystemExit(f"error: the Minari dataset {name} is not in local storage (MINARI_DATASETS_PATH "
                             f"or ~/.minari/datasets); get it with: minari download {name}") from None
        episodes = list(dataset.iterate_episodes())
        raw = {key: np.concatenate([getattr(e, attr)[: len(e.actions)] for e in episodes])
               for key, attr in [("observations", "observations"), ("actions", "actions"), ("rewards", "rewards"),
                                 ("terminals", "terminations"), ("timeouts", "truncations")]}
        raw["timeouts"] = raw["timeouts"] & ~raw["terminals"]  # ended by the time limit only: no done flag
        normalize = (functools.partial(lambda r, d: 100.0 * minari.get_normalized_score(d, np.asarray(r)), d=dataset)
                     if "ref_min_score" in dataset.storage.metadata else np.asarray)
        return name, raw, functools.partial(make_vector_env, "minari", name), normalize
    if source == "d4rl file" and D4RL_MAZE2D.match(name):
        raise SystemExit(f"error: {name} needs d4rl (maze2d has no Gymnasium equivalent): use the Docker image")
    path = (Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets")) / d4rl_filename(name)
            if source == "d4rl file" else config.dataset_path or bundled_dataset_path(name))
    if source == "d4rl file" and not path.exists():
        raise SystemExit(f"error: d4rl is not installed and {path} does not exist; "
                         f"run: python data/download_d4rl.py {name}")
    raw = read_hdf5(str(path))
    name, attrs = name if source == "d4rl file" else Path(raw["path"]).stem, raw["attrs"]
    d4rl_key = next((k for k in D4RL_REF_SCORES if name.startswith(k)), None)  # a D4RL file is evaluated in v4
    eval_env = config.eval_env or attrs.get("env") or source == "d4rl file" and f"{GYMNASIUM_IDS[d4rl_key]}-v4"
    if not eval_env:
        raise SystemExit(f"error: {raw['path']} has no 'env' attribute; pass --eval_env (a Gymnasium id)")
    if "ref_min_score" not in attrs and d4rl_key is None:
        raise SystemExit(f"error: {raw['path']} has no ref_min_score/ref_max_score attributes "
                         f"to normalise scores with; add them (see data/README.md)")
    low, high = ((float(attrs["ref_min_score"]), float(attrs["ref_max_score"])) if "ref_min_score" in attrs
                 else D4RL_REF_SCORES[d4rl_key])
    return (name, raw, functools.partial(make_vector_env, "gymnasium", str(eval_env)),
            lambda returns: 100.0 * (np.asarray(returns) - low) / (high - low))


def load_offline_data(config) -> OfflineData:
    name, raw, make_env, normalize = read_source(config)
    raw = check_dataset(raw, config.dataset_path or name)
    returns, data = episode_returns(raw), qlearning_dataset(raw)
    if len(data["rewards"]) < 2:
        raise SystemExit(f"error: {config.dataset_path or name} holds {len(data['rewards'])} transition(s) "
                         f"after dropping timeout rows; a dataset needs at least 2")
    kind = {} if normalize is not np.asarray else {"score": "raw episode return (the data has no reference scores)"}
    return OfflineData(name=name, make_eval_env=make_env, normalize_score=normalize, **kind, **data,
                       dataset_score=float(np.mean(normalize(returns))) if len(returns) else None)


class ReplayBuffer:
    """The whole dataset on the training device, states normalised once; sampling never syncs."""
    def __init__(self, data: OfflineData, device: str):
        self.state_mean, self.state_std = data.observations.mean(0), data.observations.std(0) + 1e-3
        states = [(x - self.state_mean) / self.state_std for x in (data.observations, data.next_observations)]
        self.states, self.next_states, self.actions, self.rewards, self.dones = (  # rewards, dones: [N, 1]
            torch.as_tensor(x, dtype=torch.float32, device=device)
            for x in (*states, data.actions, data.rewards[:, None], data.dones[:, None]))
        self.size, self.device = len(self.states), device
    def sample(self, batch_size: int) -> Tuple[torch.Tensor, ...]:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx], self.dones[idx]


@torch.no_grad()
def evaluate(make_env: Callable[[int], object], act: Callable[[torch.Tensor], torch.Tensor],
             state_mean: np.ndarray, state_std: np.ndarray, episodes: int, seed: int, device: str) -> np.ndarray:
    """Returns of `episodes` episodes in one vector env; `act` (or a worker's `policy_snapshot`) samples from `seed`."""
    if isinstance(act, bytes):
        torch.set_num_threads(1)
        act = torch.load(io.BytesIO(act), map_location="cpu", weights_only=False)  # our own pickle
    envs, returns, running = make_env(episodes), np.zeros(episodes), np.ones(episodes, dtype=bool)
    obs = envs.reset(seed=seed)
    obs = obs[0] if isinstance(obs, tuple) else obs
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(int(np.atleast_1d(seed)[0]))
        while running.any():
            states = torch.as_tensor((obs - state_mean) / state_std, dtype=torch.float32, device=device)
            out = envs.step(act(states).cpu().numpy())
            obs, reward, done = out[0], out[1], (out[2] | out[3]) if len(out) == 5 else out[2]  # Gymnasium; gym 0.23
            returns += reward * running  # an env that finished keeps auto-resetting: ignore it
            running &= ~np.asarray(done, dtype=bool)
    envs.close()
    return returns


def policy_snapshot(act: Callable[[torch.Tensor], torch.Tensor]) -> bytes:
    """`act` (an agent's bound method) pickled with a copy of its agent: no optimisers, its config on the CPU."""
    agent = copy.copy(act.__self__)
    agent.__dict__.update({k: None for k, v in vars(agent).items() if isinstance(v, torch.optim.Optimizer)})
    if hasattr(agent, "config"):
        agent.config = replace(agent.config, device="cpu")
    torch.save(getattr(agent, act.__name__), snapshot := io.BytesIO())
    return snapshot.getvalue()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> torch.Tensor:
    """Every generator's state (python, numpy, torch, CUDA), pickled into a tensor torch.load(weights_only) reads."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    state = pickle.dumps((random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda))
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


def set_rng_state(state: torch.Tensor) -> None:
    python, numpy, cpu, cuda = pickle.loads(state.numpy().tobytes())  # our own checkpoint's
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_atomic(obj, path: Path) -> Path:
    """torch.save (JSON for .json, the text for a str) to a temp file, then rename: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(obj, str) or path.suffix == ".json":
        tmp.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def torch_load(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: {path} is unreadable ({str(e).splitlines()[0][:120]}); it is truncated or not "
                         f"a file this script wrote: delete it (and pass the run's flags again to start over) "
                         f"or point to another file") from None


def compiled(step: Callable, config) -> Callable:
    """`--compile`: the update through torch.compile (CUDA graphs on CUDA; random draws stay fresh, same maths)."""
    cuda = torch.device(config.device).type == "cuda"
    return torch.compile(step, mode="reduce-overhead" if cuda else None) if config.compile else step


class RunLogger:
    """metrics.jsonl (cut on --resume to what the checkpoint covers) and wandb (offline by default; per-phase steps)."""
    def __init__(self, config, run_dir: Path, checkpoint: Optional[dict]):
        path, rank = run_dir / "metrics.jsonl", lambda row: (row.get("phase", "rl") == "rl", row["step"])
        if path.exists():  # keep what the checkpoint covers (pre-training phases first); the rest is logged again
            last = rank(checkpoint) if checkpoint is not None else (False, -1)
            kept = "".join(line for line in path.read_text().splitlines(True) if rank(json.loads(line)) <= last)
            save_atomic(kept, path)
        self.file, self.axes, self.wandb = open(path, "a"), set(), None
        if config.wandb_mode != "disabled":  # else wandb is not even imported
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=config.wandb_project, group=f"{ALGORITHM}-{config.env}", name=run_dir.name,
                                    config=asdict(config), dir=str(run_dir), mode=config.wandb_mode, resume="allow",
                                    id=run_dir.name, settings=wandb.Settings(silent=True, console="off"))
    def log(self, metrics: Dict[str, float], step: int, phase: str = "rl") -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        print(json.dumps({"step": step, "phase": phase, **metrics}), file=self.file, flush=True)
        if self.wandb is not None:
            for key in metrics.keys() - self.axes:
                self.wandb.define_metric(key, step_metric=f"{phase}_step")
            self.axes |= metrics.keys()
            self.wandb.log({**metrics, f"{phase}_step": step})
    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def load_yaml_config(config_class, path: str, flag: str):
    """A pyrallis YAML as a config; a missing or malformed file, unknown keys and wrong types are one error line."""
    import pyrallis
    import yaml
    if not os.path.isfile(path):
        raise SystemExit(f"error: {flag} {path} does not exist")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if unknown := (sorted(set(values) - set(config_class.__dataclass_fields__)) if isinstance(values, dict)
                       else values):
            raise SystemExit(f"error: {flag} {path}: unknown keys {unknown}; valid keys are the flags of --help")
        return pyrallis.decode(config_class, values)
    except (yaml.YAMLError, pyrallis.ParsingError, ValueError, TypeError) as e:
        kind = "is not valid YAML" if isinstance(e, yaml.YAMLError) else "has a wrong value"
        raise SystemExit(f"error: {flag} {path} {kind} ({str(e).splitlines()[0]})") from None


def check_config(config) -> None:
    """Every setting, before any data is loaded: one `error:` line that names the setting and what is allowed."""
    for name, value in asdict(config).items():
        rule = next((r for r in CHECKS if name.endswith(r[0])), None) if type(value) in (int, float, str) else None
        if rule is not None and not rule[1](value):
            raise SystemExit(f"error: --{name} {value!r} is not allowed: {rule[2]}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; pass --device cpu")
    for name in ("dataset_path", "flow_checkpoint", "vae_checkpoint"):
        if (path := getattr(config, name, None)) is not None and not os.path.isfile(path):
            raise SystemExit(f"error: --{name} {path} does not exist")
    data_source(config)  # an unknown --env is refused here, before any data is read


def parse_config(config_class, argv: List[str]):
    """tyro flags over an optional pyrallis YAML (--config_path F or =F); --resume starts from the run's config.yaml."""
    import tyro
    default = config_class()
    for i, arg in enumerate(argv):
        if arg.split("=")[0] in ("--config_path", "--config-path"):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "--")
            if path.startswith("--"):
                raise SystemExit("error: --config_path needs a value: a YAML file (algorithms/configs/*/*.yaml)")
            default = load_yaml_config(config_class, path, "--config_path")
    config = tyro.cli(config_class, args=argv, default=default, use_underscores=True)
    if config.resume is not None:
        if not (Path(config.resume) / "config.yaml").is_file():
            raise SystemExit(f"error: --resume {config.resume} is not a run directory (no config.yaml)")
        saved = load_yaml_config(config_class, str(Path(config.resume) / "config.yaml"), "--resume")
        config = tyro.cli(config_class, args=argv, default=saved, use_underscores=True)
    check_config(config)
    return config


def summarize(evaluations: List[Tuple[int, float]]) -> dict:
    scores = [score for _, score in evaluations]
    return {"final_normalized_score": (scores or [None])[-1], "best_normalized_score": max(scores, default=None),
            "last10_mean_normalized_score": float(np.mean(scores[-10:])) if scores else None,
            "evaluations": [{"step": step, "normalized_score": score} for step, score in evaluations]}


@dataclass
class Run:
    """A run directory while it trains; status.json: running, finished, interrupted or failed (a dead pid: killed)."""
    config: object
    data: OfflineData
    dir: Path
    checkpoint: Optional[dict]
    logger: RunLogger
    started: float
    phase: str = "start"
    step: int = 0
    update_time: float = 0.0  # seconds spent in phase-2 updates, over every part of a resumed run
    checkpoint_state: Optional[Callable[[], dict]] = None  # the phase's state now, for a checkpoint at a stop
    pool: Optional[ProcessPoolExecutor] = None  # the evaluation workers
    pending: Optional[list] = None  # evaluations in the workers: [(step, policy snapshot, future)]
    active = None  # the run in progress, for the Ctrl-C message
    stop_signal = None  # SIGINT or SIGTERM once a polite stop was asked for

    def elapsed(self) -> float:
        return time.time() - self.started
    def set_status(self, state: str) -> None:
        save_atomic({"state": state, "pid": os.getpid(), "host": socket.gethostname(), "phase": self.phase,
                     "step": self.step, "updated": time.time()}, self.dir / "status.json")
    def save_checkpoint(self, state: dict) -> None:
        save_atomic({**state, "phase": self.phase, "step": self.step, "rng": rng_state(),
                     "elapsed_s": self.elapsed()}, self.dir / "checkpoint.pt")
        self.set_status("running")

    def resume_agent(self, agent, buffer: "ReplayBuffer", checkpoint: Optional[dict]) -> Tuple[int, list]:
        """Phase 2 starts, from a phase-2 checkpoint if there is one; -> (last step done, evaluations)."""
        self.phase, evaluations, start, self.normalizer = "rl", [], 0, (buffer.state_mean, buffer.state_std)
        pending = lambda: [(t, torch.frombuffer(bytearray(s), dtype=torch.uint8)) for t, s, _ in self.pending or []]
        self.checkpoint_state = lambda: {"agent": agent.state_dict(), "evaluations": evaluations,
                                         "update_time_s": self.update_time, "pending_evaluations": pending()}
        if checkpoint is not None and checkpoint["phase"] == "rl":
            agent.load_state_dict(checkpoint["agent"])
            self.update_time, start = checkpoint["update_time_s"], checkpoint["step"]
            evaluations += [tuple(e) for e in checkpoint["evaluations"]]
            for step, snapshot in checkpoint.get("pending_evaluations", []):
                self.submit(step, snapshot.numpy().tobytes())
            set_rng_state(checkpoint["rng"])
        return start, evaluations
    def steps(self, start: int, total: int, desc: str):
        """start + 1 .. total with a progress bar (else a line every 30 s); a polite stop checkpoints between steps."""
        from tqdm import tqdm
        terminal, last_line = sys.stderr.isatty(), time.time()
        for step in tqdm(range(start + 1, total + 1), desc, total, initial=start, mininterval=5, disable=not terminal):
            if Run.stop_signal is not None and self.checkpoint_state is not None:
                self.save_checkpoint(self.checkpoint_state())  # of step - 1, the last one done
                raise KeyboardInterrupt
            if not terminal and time.time() - last_line >= 30:
                print(f"{desc}: step {step - 1}/{total}", file=sys.stderr, flush=True)
                last_line = time.time()
            self.step = step
            yield step
        self.checkpoint_state = None
    def timed(self, update: Callable[[], dict]) -> dict:
        tick, metrics = time.perf_counter(), update()
        self.update_time += time.perf_counter() - tick
        return metrics
    def checkpoint_agent(self, agent, evaluations: list) -> None:
        """Every `checkpoint_every` steps (default: each evaluation) and at the end; with the pending evaluations."""
        every = self.config.checkpoint_every or self.config.eval_every
        if self.step % every == 0 or self.step == self.config.train_steps:
            self.save_checkpoint(self.checkpoint_state())
    def agent_results(self, evaluations: list) -> dict:
        self.collect(evaluations, keep=0)
        rate = self.config.train_steps / self.update_time if self.update_time > 0 else None
        return {**summarize(evaluations), "updates_per_s": rate}

    def note(self, message: str) -> None:
        __import__("tqdm").tqdm.write(message)
    def workers(self) -> int:
        """--eval_workers; by default 1 with 4+ cores (with fewer, a worker would take the training's core)."""
        return self.config.eval_workers if self.config.eval_workers is not None else int((os.cpu_count() or 1) >= 4)
    def evaluate(self, act: Callable[[torch.Tensor], torch.Tensor], buffer: "ReplayBuffer", evaluations: list) -> None:
        """This step's evaluation: here (eval_workers 0) or in a worker process (at most 2 per worker pending)."""
        if self.workers():
            self.submit(self.step, policy_snapshot(act))
            return self.collect(evaluations, keep=2 * self.workers())
        if self.config.compile and torch.device(self.config.device).type == "cuda":  # acting captured like the update
            act = torch.compile(act, mode="reduce-overhead")
        self.record(self.step, evaluate(self.data.make_eval_env, act, buffer.state_mean, buffer.state_std,
                                        self.config.eval_episodes, self.config.seed, self.config.device), evaluations)
    def submit(self, step: int, snapshot: bytes) -> None:
        if self.pool is None:
            self.pool, self.pending = ProcessPoolExecutor(self.workers(), multiprocessing.get_context("spawn")), []
        args = self.data.make_eval_env, snapshot, *self.normalizer, self.config.eval_episodes, self.config.seed, "cpu"
        self.pending.append((step, snapshot, self.pool.submit(evaluate, *args)))
    def collect(self, evaluations: list, keep: int) -> None:
        """Record the finished evaluations in step order, waiting while more than `keep` are pending."""
        while self.pending and (len(self.pending) > keep or self.pending[0][2].done()):
            try:
                returns = self.pending[0][2].result()
            except BrokenProcessPool as e:
                raise SystemExit(f"error: an evaluation worker died ({e}); the run stopped at step {self.step} with "
                                 f"its last checkpoint kept: continue with python {sys.argv[0]} --resume "
                                 f"{self.dir}")
            self.record(self.pending.pop(0)[0], returns, evaluations)
    def record(self, step: int, returns: np.ndarray, evaluations: list) -> None:
        score, ref = float(np.mean(self.data.normalize_score(returns))), self.data.dataset_score
        self.logger.log({"eval/normalized_score": score, "eval/return": float(returns.mean())}, step=step)
        self.note(f"step {step}  normalized {score:.1f}" + ("" if ref is None else f"  (dataset average {ref:.1f})"))
        evaluations.append((step, score))
    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def start_run(config, data: OfflineData) -> Run:
    """Check the eval env; make RUN_DIR (`<algo>-<data>-seed<s>-<time>`) or reopen --resume's; config.yaml, seed."""
    torch.set_num_threads(config.cpu_threads or torch.get_num_threads())
    probe = data.make_eval_env(1)
    dims = probe.single_observation_space.shape[0], probe.single_action_space.shape[0]
    probe.close()
    if dims != (want := (data.observations.shape[1], data.actions.shape[1])):
        raise SystemExit(f"error: the data has {want[0]}-dim observations and {want[1]}-dim actions, the evaluation "
                         f"env {dims[0]} and {dims[1]}; pass the matching --eval_env")
    flat = re.sub(r"[^A-Za-z0-9._-]+", "_", data.name)  # a Minari id's slashes
    run_dir = Path(config.resume or Path(config.checkpoints_path) / (
        config.run_name or f"{ALGORITHM}-{flat}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(__import__("pyrallis").dump(config), run_dir / "config.yaml")
    checkpoint = torch_load(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").exists() else None
    set_seed(config.seed)
    run = Run(config, data, run_dir, checkpoint, RunLogger(config, run_dir, checkpoint),
              time.time() - (checkpoint or {}).get("elapsed_s", 0.0))
    run.set_status("running")
    Run.active = run
    return run


def finish_run(run: Run, results: dict) -> Path:
    """results.json (scores, the dataset's own average, wall time of all parts), status 'finished'."""
    run.logger.close()
    run.close()
    config, data, summary = run.config, run.data, results.get("last10_mean_normalized_score")
    results = {"algorithm": ALGORITHM, "dataset": data.name, "seed": config.seed, "train_steps": config.train_steps,
               **results, "score": data.score, "dataset_normalized_score": data.dataset_score,
               "wall_time_s": run.elapsed()}
    path = save_atomic(results, run.dir / "results.json")
    run.phase, Run.active = "done", None
    run.set_status("finished")
    if summary is not None:
        reference = f" (dataset average {data.dataset_score:.1f})" if data.dataset_score is not None else ""
        print(f"{ALGORITHM} on {data.name}: last-10 mean normalized {summary:.1f}, final "
              f"{results['final_normalized_score']:.1f}{reference}, {results['wall_time_s']:.0f} s")
    return path


def polite_stop(signum: int, frame) -> None:
    """Ctrl-C, SIGTERM: stop after this step (`Run.steps`), or now where that cannot checkpoint or at a 2nd signal."""
    first, Run.stop_signal = Run.stop_signal is None, Run.stop_signal or signum
    if not first or Run.active is None or Run.active.checkpoint_state is None:
        raise KeyboardInterrupt


def main(train: Callable, config_class) -> None:
    """Parse, train, print the results path; a polite stop prints how to resume and exits 130 (SIGINT) or 143."""
    config = parse_config(config_class, sys.argv[1:])
    signal.signal(signal.SIGTERM, polite_stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
        signal.signal(signal.SIGINT, polite_stop)
    try:
        path = train(config)
    except BaseException as e:
        run, stopped = Run.active, isinstance(e, KeyboardInterrupt)
        if run is not None:
            run.close()
            run.set_status("interrupted" if stopped else "failed")
        if not stopped:
            raise
        print(f"\ninterrupted in {run.phase} at step {run.step}; continue with: python {sys.argv[0]} --resume {run.dir}"
              if run else "interrupted before the run directory existed; nothing to resume", file=sys.stderr)
        raise SystemExit(128 + (Run.stop_signal or signal.SIGINT)) from None
    print(f"results: {path}")


if __name__ == "__main__":
    main(train, TrainConfig)
