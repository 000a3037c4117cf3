"""Selecting from Behavior Candidates (SfBC): a diffusion behaviour model, and a critic that picks among its samples.

Chen, Lu, Ying, Su, Zhu, "Offline Reinforcement Learning via High-Fidelity Generative Behavior Modeling"
(ICLR 2023, arXiv 2209.14548; official code ChenDRAG/SfBC). The other generative-model approach that CNF
(Akimov et al., arXiv 2211.11096) is compared with: instead of a policy in a generative model's latent
space, SfBC draws many candidate actions from an expressive behaviour model and selects among them with a
critic learned by in-sample planning; there is no policy network at all. Reported (D4RL normalised scores,
medium / medium-replay / medium-expert): halfcheetah 45.9 / 37.1 / 92.6, hopper 57.1 / 86.2 / 108.6,
walker2d 77.9 / 65.1 / 109.8; antmaze-umaze-v0 93.3, antmaze-umaze-diverse-v0 86.7.

    python algorithms/sfbc.py --config_path algorithms/configs/sfbc/hopper-medium-v2.yaml     # the official values
    python algorithms/sfbc.py --env halfcheetah-medium-v2                                       # same (the defaults)
    python algorithms/sfbc.py --config_path algorithms/configs/sfbc/quick.yaml                  # CPU quick preset
    python algorithms/sfbc.py --dataset_path FILE.hdf5 --eval_env Hopper-v4                     # any D4RL-format file

The algorithm, in the paper's order (each step's equations are beside its code below):
1. Behaviour model: a conditional diffusion model of pi_beta(a | s) on a variance-preserving SDE with linear
   beta(t) from 0.1 to 20; a noise-prediction network eps_theta(a_t, t, s) trained on the dataset's actions
   (`ScoreNetwork`, `BehaviorTrainer`; `train_steps` steps of Adam 1e-4, batch 4096).
2. Sampler: DPM-Solver (singlestep, order 3, 15 function evaluations, t from 1 to 1e-3) solves the
   probability-flow ODE from Gaussian noise to actions (`dpm_solver_sample`), for [states, candidates] at once.
3. Values by in-sample planning: a critic Q(s, a) regresses the normalised discounted Monte-Carlo returns;
   then K - 1 times: V(s) = sum_j softmax(alpha Q(s, a_j)) Q(s, a_j) over 16 cached behaviour candidates
   a_j per dataset state, new targets R_i = max(r_i + gamma R_{i+1} (1 - done_i), V(s_i)) backwards through
   each episode, normalised again, and a re-initialised critic fits them (`planned_returns`, `CriticTrainer`).
4. Acting: 32 candidates per state, probabilities softmax(100 Q); 4 drawn without replacement and averaged on
   locomotion, 1 elsewhere (`select_actions`).
Evaluation (10 episodes stepped together) comes every `eval_every` critic updates and at the end of every
planning round; the last one is the final policy's score (`final_normalized_score`; with 2 rounds and evaluations
every 5000 updates the last-10 mean also holds the first round's, unplanned, policy). Checkpoints: the behaviour
phase writes checkpoint.pt every `checkpoint_every` (default `eval_every`) steps and RUN_DIR/behavior.pt at its
end, the candidates go to RUN_DIR/candidates.pt, and the planning phase writes checkpoint.pt every
`checkpoint_every` critic updates, at the end of every round and after every planning step (a polite stop, Ctrl-C
or SIGTERM, at any step of both phases); `--resume RUN_DIR` continues any phase bit-for-bit (tests/test_sfbc.py
stops runs in each phase).

Cost at the official sizes on one H200 (tests/benchmarks/throughput.py): 199 behaviour steps/s eager, 529 with
`--compile` (586k steps: about 18 minutes); 0.76M candidate actions/s (2.2M with `--amp`: a 1M-state dataset's
16M candidates in 7 to 21 s); 2 x 24.5k critic updates at about 960/s; one evaluation step (32 candidates for
each of 10 states) 14.7 ms eager, 6.8 ms with `--compile`, so a 1000-step evaluation takes 7 to 15 s.

Reading order: config, the four steps (behaviour model, sampler, planning, acting), the loop (`train`); then, below
two banners, SfBC's extras (its settings' checks; the behaviour and planning phases' bookkeeping: resume, checkpoints,
logged losses, rates) and the plumbing every file shares (data sources, state normalisation, evaluation). The
experiment fields are cnf.py's, marked `# Copied from cnf.py: TrainConfig[experiment]` (tests/test_copies.py).

Where the official code is silent, and deliberate deviations from it:
- Episodes come from the shared q-learning conversion, which drops each timeout row (the official code keeps
  it: one more transition per episode, its reward part of the returns). An episode ends at a terminal, or
  where the next transition does not start from this one's next observation (a dropped timeout row, the end
  of the file); both end the returns' recursion (official: done = terminal or timeout). maze2d: the official
  code treats the whole file as one episode; here its timeouts end episodes too.
- States are normalised by the dataset's mean and std (every file here does so); the official networks see
  raw states.
- The network predicts the noise eps directly, loss ||eps_theta - eps||^2 summed over action dimensions; the
  official network outputs h with score h / sigma_t and loss ||h + eps||^2: the same function up to the sign
  of the last layer. The (time, state) features are computed once per state and shared by its candidates.
- Batches are drawn with replacement for a number of steps (official: shuffled epochs). `train_steps` 586k
  is the official 600 epochs of 4M samples at batch 4096; `critic_steps` 24.5k per round its 100 epochs of
  1M samples (the official second round has 99).
- Samples are clamped to the action box [-1, 1] (the official code does not clamp; MuJoCo clamps controls,
  and the critic never saw an action outside the box).
- Candidates for planning are sampled once and reused by every round, as the official code does (the
  behaviour model does not change between rounds). `--planning_states N` (default: all) gives candidates and
  V(s) to N random dataset states only, the others keep the plain bootstrap r + gamma R: for CPU presets.
- Drawing without replacement from softmax(alpha Q) uses Gumbel-top-k (the same law as the official sequential
  numpy draw, no host round trip); the logits are capped at the k-th largest + 40 as in the official code.
- The critic is re-initialised to its initial weights at every round, as the official code does (one critic;
  the official model builds two and uses the first). No target network: the targets are fixed per round.
- Evaluation every `eval_every` critic updates: 5000, the CNF paper's protocol (its per-dataset YAMLs: every 100
  on HalfCheetah, checkpoints every 5000), not the official every 5 epochs (about 1225 updates); 10 episodes seeded
  by --seed (official: 10 while training the critic, seeded seed + 1001 + i); acting draws its noise from a stream
  seeded by --seed too, apart from training's (the shared `evaluate`), so evaluations never change the training.
- `--amp`: bfloat16 matmuls in the hidden layers of the score network and the critic (output layers float32).
  `--compile`: the behaviour step and the critic update go through torch.compile, on a GPU (CUDA graphs) the whole
  acting step too (15 solver evaluations, critic, selection; compiled by the shared evaluation); candidate
  generation stays eager (it is compute-bound).
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
import torch.nn.functional as F

ALGORITHM = "sfbc"
LOCOMOTION_NAME = re.compile(r"^(halfcheetah|hopper|walker)", re.IGNORECASE)  # official: 4 draws averaged there


@dataclass
class TrainConfig:
    # --- 1. behaviour model: diffusion model of pi_beta(a | s) on a VP-SDE (official train_behavior.py) ---
    score_widths: Tuple[int, ...] = (512, 256, 128)  # residual blocks down the score network, mirrored up ("large")
    behavior_lr: float = 1e-4  # Adam learning rate of the score network
    beta_min: float = 0.1  # linear noise schedule beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1]
    beta_max: float = 20.0  # beta(1)
    # --- 2. sampler: DPM-Solver (singlestep "fast", time-uniform grid) ---
    solver_steps: int = 15  # function evaluations per sample
    solver_order: int = 3  # highest order of the solver's steps: 1 (DDIM), 2 or 3
    solver_t_end: float = 1e-3  # the probability-flow ODE is solved from t = 1 down to this t
    sampler_batch: int = 65_536  # candidate actions per sampler pass while generating for the dataset (memory)
    # --- 3. values by in-sample planning (official train_critic.py) ---
    planning_candidates: int = 16  # behaviour actions per dataset state for V(s), sampled once and cached
    planning_states: Optional[int] = None  # dataset states given candidates and V(s) (default: all; CPU presets: fewer)
    planning_rounds: int = 2  # K critic fits: the first on Monte-Carlo returns, each later one on planned targets
    critic_steps: int = 24_500  # critic updates per round (official: 100 epochs of 1M samples at batch 4096)
    critic_hidden: int = 256  # critic (s, a) -> hidden -> hidden -> 1, SiLU
    critic_lr: float = 1e-3  # Adam learning rate of the critic
    gamma: float = 0.99  # discount of the returns
    value_alpha: float = 20.0  # V(s) = sum_j softmax(alpha Q(s, a_j)) Q(s, a_j) over the candidates
    # --- 4. acting ---
    eval_candidates: int = 32  # behaviour actions sampled per state when acting
    select_alpha: float = 100.0  # selection probabilities softmax(alpha Q) over the candidates
    select_count: Optional[int] = None  # candidates drawn without replacement, averaged (default: 4 locomotion, else 1)
    # --- schedule ---
    train_steps: int = 586_000  # behaviour-model steps (official: 600 epochs of 4M samples at batch 4096)
    batch_size: int = 4096  # batch of the behaviour model and of the critic (official: 4096 both)
    eval_every: int = 5_000  # critic updates between evaluations (and at the end of every planning round)
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


# %% 1. Behaviour model: a_t = alpha_t a + sigma_t eps, eps_theta(a_t, t, s) ~ eps
class VPSDE:
    """Variance-preserving SDE da = -beta(t) a / 2 dt + sqrt(beta(t)) dW, beta(t) = beta_min + t (beta_max - beta_min),
    t in [0, 1]. Its marginals: a_t = alpha_t a_0 + sigma_t eps with log alpha_t = -t^2 (beta_max - beta_min) / 4
    - t beta_min / 2 and sigma_t^2 = 1 - alpha_t^2; lambda_t = log(alpha_t / sigma_t) is DPM-Solver's time variable."""

    def __init__(self, beta_min: float, beta_max: float):
        self.beta_min, self.beta_max = beta_min, beta_max

    def log_alpha(self, t):
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_sigma(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self.log_alpha(t)
        return log_alpha.exp(), torch.sqrt(-torch.expm1(2.0 * log_alpha))

    def coefficients(self, t: float) -> Tuple[float, float, float]:
        """(alpha_t, sigma_t, lambda_t) of one time, as python floats (the solver's coefficients)."""
        log_alpha = self.log_alpha(t)
        log_sigma = 0.5 * math.log(-math.expm1(2.0 * log_alpha))
        return math.exp(log_alpha), math.exp(log_sigma), log_alpha - log_sigma


class FourierTimeFeatures(nn.Module):
    """[sin(2 pi W t), cos(2 pi W t)] with W ~ N(0, scale^2) drawn once and fixed (official: 32 features, scale 30)."""

    def __init__(self, dim: int = 32, scale: float = 30.0):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(dim // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B, dim]
        angles = 2.0 * math.pi * t[:, None] * self.frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResidualBlock(nn.Module):
    """h = SiLU(W_1 x) + W_c SiLU(c); out = SiLU(W_2 h) + skip(x), skip linear where the width changes (official
    Residual_Block); c the (time, state) features, given with SiLU applied, [B, c] or [S, 1, c] for [S, C, .]."""

    def __init__(self, in_dim: int, out_dim: int, condition_dim: int):
        super().__init__()
        self.dense_1, self.dense_2 = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)
        self.condition = nn.Linear(condition_dim, out_dim)
        self.skip = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, silu_condition: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.dense_1(x)) + self.condition(silu_condition)
        return F.silu(self.dense_2(h)) + self.skip(x)


class ScoreNetwork(nn.Module):
    """eps_theta(a_t, t, s), the official "large" ScoreNet: time -> Fourier features (32) -> Linear(32, 32); state ->
    Linear(s, 32) -> SiLU; both -> Linear(64, 128) -> SiLU -> Linear(128, 128) = c. A U-shaped residual MLP: blocks
    down through `widths` (512, 256, 128), one in the middle, blocks up through the widths reversed, each up block
    and the output layer fed [the down block's output, the previous output] (skip connections)."""

    def __init__(self, action_dim: int, state_dim: int, widths: Tuple[int, ...], amp: bool = False):
        super().__init__()
        self.action_dim, self.state_dim, self.widths, self.amp = action_dim, state_dim, tuple(widths), amp
        self.time_features = nn.Sequential(FourierTimeFeatures(32), nn.Linear(32, 32))
        self.state_features = nn.Sequential(nn.Linear(state_dim, 32), nn.SiLU())
        self.condition = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 128))
        ins = (action_dim,) + self.widths[:-1]
        self.down = nn.ModuleList(ResidualBlock(i, w, 128) for i, w in zip(ins, self.widths))
        self.middle = ResidualBlock(self.widths[-1], self.widths[-1], 128)
        self.up = nn.ModuleList(ResidualBlock(2 * self.widths[i + 1], self.widths[i], 128)
                                for i in reversed(range(len(self.widths) - 1)))
        self.out = nn.Linear(2 * self.widths[0], action_dim)

    def forward(self, noisy_actions: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """noisy_actions [B, act_dim] with t [B] and states [B, state_dim], or candidates [S, C, act_dim] with t [S]
        and states [S, state_dim] (the C candidates of a state share its features). -> predicted noise, same shape."""
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            c = self.condition(torch.cat([self.state_features(states), self.time_features(t)], dim=-1))
            c = F.silu(c)  # every block applies SiLU to c first: once here
            if noisy_actions.dim() == 3:
                c = c.unsqueeze(1)
            h, skips = noisy_actions, []
            for block in self.down:
                h = block(h, c)
                skips.append(h)
            h = self.middle(h, c)
            for block in self.up:
                h = block(torch.cat([skips.pop(), h], dim=-1), c)
            h = torch.cat([skips.pop(), h], dim=-1)
        return self.out(h.float())

    def describe(self) -> dict:
        return {"action_dim": self.action_dim, "state_dim": self.state_dim, "widths": list(self.widths)}


class BehaviorTrainer:
    """Denoising (noise-prediction) loss, Adam; one `train` call = one step:
    t ~ U(1e-5, 1), eps ~ N(0, I), a_t = alpha_t a + sigma_t eps, loss = E ||eps_theta(a_t, t, s) - eps||^2."""

    T_MIN = 1e-5  # official: t ~ U(1e-5, 1)

    def __init__(self, model: ScoreNetwork, sde: VPSDE, config: TrainConfig):
        self.model, self.sde = model, sde
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.behavior_lr, fused=fused)

    def train(self, states: torch.Tensor, actions: torch.Tensor) -> Dict[str, torch.Tensor]:
        t = torch.rand(len(actions), device=actions.device) * (1.0 - self.T_MIN) + self.T_MIN  # [B]
        noise = torch.randn_like(actions)
        alpha, sigma = self.sde.alpha_sigma(t)
        noisy = alpha[:, None] * actions + sigma[:, None] * noise
        loss = ((self.model(noisy, t, states) - noise) ** 2).sum(-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"behavior/loss": loss.detach()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


# %% 2. Sampler: DPM-Solver on the probability-flow ODE
def solver_orders(steps: int, order: int) -> List[int]:
    """DPM-Solver-fast: the order of each step, using exactly `steps` function evaluations (order 3: steps 3, ...,
    3 then one step of 2 and one of 1, or one of `steps % 3`; order 2: steps of 2 and one of 1 if `steps` is odd)."""
    if order == 3:
        return [3] * (steps // 3 - 1) + [2, 1] if steps % 3 == 0 else [3] * (steps // 3) + [steps % 3]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


@torch.no_grad()
def dpm_solver_sample(predict_noise: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor, sde: VPSDE,
                      steps: int, order: int, t_end: float) -> torch.Tensor:
    """Solve the probability-flow ODE da/dt = -beta(t) / 2 (a - eps_theta(a, t) / sigma_t) from a_1 = noise to
    t_end with singlestep DPM-Solver (Lu et al. 2022). In lambda = log(alpha / sigma) its exact solution is
    a_t = (alpha_t / alpha_s) a_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps_theta d lambda; each step
    expands eps_theta in lambda around s to first, second or third order. Times: a uniform grid of `steps` + 1
    points from 1 to t_end; a step of order k spans k grid intervals and evaluates eps_theta at its k first
    points. predict_noise(a, t) -> eps_theta for every row of `a` at the shared time t (a python float)."""
    times = [1.0 + (t_end - 1.0) * i / steps for i in range(steps + 1)]
    alpha, sigma, lam = zip(*(sde.coefficients(t) for t in times))
    x, i = noise, 0
    for k in solver_orders(steps, order):
        s, t = i, i + k
        h = lam[t] - lam[s]  # step length in lambda
        eps_s = predict_noise(x, times[s])
        # First order (DDIM): a_t = (alpha_t / alpha_s) a_s - sigma_t (e^h - 1) eps_s.
        first_order = (alpha[t] / alpha[s]) * x - (sigma[t] * math.expm1(h)) * eps_s
        if k == 1:
            x = first_order
        else:
            # Intermediate point s1 (the next grid time), r1 = (lambda_s1 - lambda_s) / h:
            # u_1 = (alpha_s1 / alpha_s) a_s - sigma_s1 (e^{r1 h} - 1) eps_s.
            s1 = s + 1
            r1 = (lam[s1] - lam[s]) / h
            u_1 = (alpha[s1] / alpha[s]) * x - (sigma[s1] * math.expm1(r1 * h)) * eps_s
            d_1 = predict_noise(u_1, times[s1]) - eps_s
            if k == 2:
                # DPM-Solver-2: a_t = first order - sigma_t (e^h - 1) / (2 r1) (eps(u_1, s1) - eps_s).
                x = first_order - (sigma[t] * math.expm1(h) / (2.0 * r1)) * d_1
            else:
                # DPM-Solver-3, second intermediate point s2, r2 = (lambda_s2 - lambda_s) / h:
                # u_2 = (alpha_s2 / alpha_s) a_s - sigma_s2 (e^{r2 h} - 1) eps_s
                #       - sigma_s2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) (eps(u_1, s1) - eps_s);
                # a_t = first order - sigma_t / r2 ((e^h - 1) / h - 1) (eps(u_2, s2) - eps_s).
                s2 = s + 2
                r2 = (lam[s2] - lam[s]) / h
                phi_22 = math.expm1(r2 * h) / (r2 * h) - 1.0
                u_2 = ((alpha[s2] / alpha[s]) * x - (sigma[s2] * math.expm1(r2 * h)) * eps_s
                       - (sigma[s2] * r2 / r1 * phi_22) * d_1)
                d_2 = predict_noise(u_2, times[s2]) - eps_s
                x = first_order - (sigma[t] / r2 * (math.expm1(h) / h - 1.0)) * d_2
        i = t
    return x


@torch.no_grad()
def sample_actions(model: nn.Module, states: torch.Tensor, n: int, sde: VPSDE, config: TrainConfig) -> torch.Tensor:
    """n behaviour actions for each state, all states in one sampler pass: states [S, state_dim] -> [S, n, act_dim],
    clamped to the action box. `model(noisy [S, n, act_dim], t [S], states)` predicts the noise."""
    noise = torch.randn(len(states), n, model.action_dim, device=states.device)
    times = {}  # t -> [S] tensor, reused by the states' candidates

    def predict_noise(x: torch.Tensor, t: float) -> torch.Tensor:
        if t not in times:
            times[t] = torch.full((len(states),), t, device=states.device)
        return model(x, times[t], states)

    actions = dpm_solver_sample(predict_noise, noise, sde, config.solver_steps, config.solver_order,
                                config.solver_t_end)
    return actions.clamp(-1.0, 1.0)


# %% 3. Values by in-sample planning
class Critic(nn.Module):
    """Q(s, a): (s, a) -> hidden -> hidden -> 1 with SiLU (official MlpQnet); float32 output layer."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, amp: bool = False):
        super().__init__()
        self.amp = amp
        self.hidden = nn.Sequential(nn.Linear(state_dim + action_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                    nn.SiLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:  # [..., 1]
        x = torch.cat([states, actions], dim=-1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            h = self.hidden(x)
        return self.out(h.float())


class CriticTrainer:
    """Q regresses the current (normalised) targets: loss = E (Q(s, a) - R)^2, Adam; one `train` call = one step.
    `reset` restores the critic's initial weights and a fresh optimiser (every planning round, as official)."""

    def __init__(self, critic: Critic, config: TrainConfig):
        self.critic, self.lr = critic, config.critic_lr
        self.fused = torch.device(config.device).type in ("cpu", "cuda")
        self.initial = copy.deepcopy(critic.state_dict())
        self.reset()

    def reset(self) -> None:
        self.critic.load_state_dict(self.initial)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.lr, fused=self.fused)

    def train(self, states: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        q = self.critic(states, actions)  # [B, 1]
        loss = ((q - targets) ** 2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"critic/loss": loss.detach(), "critic/q_mean": q.detach().mean()}

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict(), "initial": self.initial}

    def load_state_dict(self, state: dict) -> None:
        self.initial = state["initial"]
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])


def episode_ends(data: "OfflineData") -> np.ndarray:
    """[N] bool, True at the last transition of an episode: a terminal, or where the next transition does not
    start from this one's next observation (the conversion dropped a timeout row there), or the file's end."""
    ends = data.dones > 0
    ends[:-1] |= (data.next_observations[:-1] != data.observations[1:]).any(axis=1)
    ends[-1] = True
    return ends


def planned_returns(rewards: np.ndarray, ends: np.ndarray, gamma: float,
                    values: Optional[np.ndarray] = None) -> np.ndarray:
    """Backwards through the data: R_i = max(r_i + gamma R_{i+1} (1 - done_i), V(s_i)), done_i = ends[i].
    Without values (or V = -inf) it is the discounted Monte-Carlo return R_i = r_i + gamma R_{i+1} (1 - done_i).
    A larger V never gives a smaller R, and R >= the Monte-Carlo return. -> [N] float64."""
    rewards, ends = rewards.astype(np.float64).tolist(), ends.tolist()
    values = values.astype(np.float64).tolist() if values is not None else None
    returns, following = np.empty(len(rewards)), 0.0
    for i in range(len(rewards) - 1, -1, -1):  # a python loop: about a second per million rows
        following = rewards[i] + (0.0 if ends[i] else gamma * following)
        if values is not None and values[i] > following:
            following = values[i]
        returns[i] = following
    return returns


def normalize_returns(returns: np.ndarray) -> Tuple[np.ndarray, float, float]:
    """(R - mean) / max(std, 0.1), as the official code; -> (normalised float32, mean, the divisor)."""
    mean, std = float(returns.mean()), max(float(returns.std()), 0.1)
    return ((returns - mean) / std).astype(np.float32), mean, std


@torch.no_grad()
def soft_values(critic: Critic, states: torch.Tensor, candidates: torch.Tensor, alpha: float,
                batch: int) -> torch.Tensor:
    """V(s) = sum_j softmax_j(alpha Q(s, a_j)) Q(s, a_j) over each state's candidates: [P, M, act_dim] -> [P]."""
    values = []
    for i in range(0, len(states), batch):
        chunk = candidates[i:i + batch]  # [n, M, act_dim]
        q = critic(states[i:i + batch, None].expand(-1, chunk.shape[1], -1), chunk)[..., 0]  # [n, M]
        values.append((torch.softmax(alpha * q, dim=-1) * q).sum(-1))
    return torch.cat(values)


# %% 4. Acting: select among behaviour candidates
def select_actions(candidates: torch.Tensor, q: torch.Tensor, alpha: float, count: int) -> torch.Tensor:
    """candidates [E, C, act_dim], q [E, C] -> [E, act_dim]: draw `count` candidates without replacement with
    probabilities softmax(alpha q) and average them. Logits above the count-th largest + 40 are capped there
    (official). Gumbel-top-k: the top `count` of logits + Gumbel noise are a draw without replacement."""
    logits = alpha * q
    logits = torch.minimum(logits, logits.topk(count, dim=-1).values[:, -1:] + 40.0)
    gumbel = -torch.empty_like(logits).exponential_().log()
    chosen = (logits + gumbel).topk(count, dim=-1).indices  # [E, count]
    return candidates.gather(1, chosen[..., None].expand(-1, -1, candidates.shape[-1])).mean(1)


class SfBC:
    """The policy: no network of its own; behaviour candidates selected by the critic (step 4)."""

    def __init__(self, behavior: ScoreNetwork, critic: Critic, sde: VPSDE, config: TrainConfig, select_count: int):
        self.behavior, self.critic, self.sde = behavior, critic, sde
        self.config, self.select_count = config, select_count

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Normalised states [E, state_dim] -> actions [E, act_dim], every state's candidates in one pass."""
        cfg = self.config
        candidates = sample_actions(self.behavior, states, cfg.eval_candidates, self.sde, cfg)  # [E, C, act_dim]
        q = self.critic(states[:, None].expand(-1, cfg.eval_candidates, -1), candidates)[..., 0]  # [E, C]
        return select_actions(candidates, q, cfg.select_alpha, self.select_count)


# %% The loop: behaviour model, candidates, planning rounds with evaluations
def train_behavior(config: TrainConfig, buffer: "ReplayBuffer", sde: VPSDE,
                   run: "Run") -> Tuple[ScoreNetwork, Optional[float]]:
    """Step 1: the denoising loss for `train_steps` steps on batches drawn with replacement. -> (the model, frozen,
    also written to RUN_DIR/behavior.pt; the steps per second of this process, None if it ran none)."""
    behavior = ScoreNetwork(buffer.actions.shape[1], buffer.states.shape[1], config.score_widths, config.amp)
    trainer = BehaviorTrainer(behavior.to(config.device), sde, config)
    progress = BehaviorProgress.start(run, trainer)  # a resumed run continues from its checkpoint (below)

    def behavior_step() -> torch.Tensor:
        idx = torch.randint(0, buffer.size, (config.batch_size,), device=buffer.device)
        return trainer.train(buffer.states[idx], buffer.actions[idx])["behavior/loss"]

    update = compiled(behavior_step, config)
    for _ in progress.steps(config.train_steps):  # none once RUN_DIR/behavior.pt exists
        progress.add(update)  # one step, timed; its loss logged every `log_every` steps, checkpoints
    return progress.frozen_model(buffer), progress.rate()


def generate_candidates(config: TrainConfig, buffer: "ReplayBuffer", behavior: ScoreNetwork, sde: VPSDE,
                        run: "Run") -> Tuple[dict, Optional[float]]:
    """Step 3's cache: `planning_candidates` behaviour actions for every planning state, in sampler passes of
    `sampler_batch` actions; written to RUN_DIR/candidates.pt. -> (cache, candidate actions per second)."""
    if (run.dir / "candidates.pt").exists():  # a resumed run's, with the RNG state after it
        return cached_candidates(run), None
    from tqdm import tqdm

    if config.planning_states is None or config.planning_states >= buffer.size:
        indices = torch.arange(buffer.size)
    else:
        indices = torch.randperm(buffer.size)[:config.planning_states].sort().values
    indices = indices.to(buffer.device)
    per_pass = max(1, config.sampler_batch // config.planning_candidates)
    started, chunks = time.perf_counter(), []
    for i in tqdm(range(0, len(indices), per_pass), desc="2. candidates", mininterval=5):
        states = buffer.states[indices[i:i + per_pass]]
        chunks.append(sample_actions(behavior, states, config.planning_candidates, sde, config))
    candidates = torch.cat(chunks)  # [P, M, act_dim]
    rate = candidates.shape[0] * candidates.shape[1] / max(time.perf_counter() - started, 1e-9)
    cache = {"indices": indices.cpu(), "candidates": candidates.cpu(), "rng": rng_state()}
    save_atomic(cache, run.dir / "candidates.pt")
    return cache, rate


def plan(critic: Critic, buffer: "ReplayBuffer", cache: dict, rewards: np.ndarray, ends: np.ndarray,
         return_mean: float, return_std: float, config: TrainConfig) -> Tuple[np.ndarray, float, float, float]:
    """One planning step: V(s) over the cached candidates, in return units, and R_i = max(r_i + gamma R_{i+1}
    (1 - done_i), V(s_i)) backwards, normalised. -> (targets, mean, std, fraction of states where V won)."""
    planned = cache["indices"].numpy()
    values = np.full(buffer.size, -np.inf)  # states without candidates (--planning_states) keep the bootstrap
    soft = soft_values(critic, buffer.states[cache["indices"].to(buffer.device)], cache["candidates"].to(buffer.device),
                       config.value_alpha, max(1, config.sampler_batch // config.planning_candidates))
    values[planned] = soft.double().cpu().numpy() * return_std + return_mean
    returns = planned_returns(rewards, ends, config.gamma, values)
    return (*normalize_returns(returns), float(np.mean(values[planned] >= returns[planned])))


def train(config: TrainConfig) -> Path:
    """Steps 1-4: behaviour model, candidates, planning rounds with evaluations; returns results.json's path."""
    check_sfbc_config(config)
    data = load_offline_data(config)
    run = start_run(config, data)
    buffer = ReplayBuffer(data, config.device)
    sde = VPSDE(config.beta_min, config.beta_max)
    behavior, behavior_rate = train_behavior(config, buffer, sde, run)  # step 1
    cache, candidate_rate = generate_candidates(config, buffer, behavior, sde, run)  # step 3's cache

    # Step 3: in-sample planning; round 0 fits the Monte-Carlo returns, every later round planned targets.
    rewards, ends = data.rewards, episode_ends(data)
    critic = Critic(buffer.states.shape[1], buffer.actions.shape[1], config.critic_hidden, config.amp)
    critic_trainer = CriticTrainer(critic.to(config.device), config)
    progress = PlanningProgress.start(run, critic_trainer, buffer, rewards, ends)  # or a resumed run's (below)
    select_count = config.select_count or (4 if LOCOMOTION_NAME.match(data.name) else 1)
    agent = SfBC(behavior, critic, sde, config, select_count)

    def critic_step() -> Dict[str, torch.Tensor]:
        idx = torch.randint(0, buffer.size, (config.batch_size,), device=buffer.device)
        return critic_trainer.train(buffer.states[idx], buffer.actions[idx], progress.targets[idx])

    update = compiled(critic_step, config)
    for round_ in range(progress.round, config.planning_rounds):
        for step in progress.steps(round_):  # the round's critic updates; run.step counts them over all rounds
            metrics = run.timed(update)
            if step % config.log_every == 0:
                run.logger.log({k: v.item() for k, v in metrics.items()}, run.step)
            if step % config.eval_every == 0 or step == config.critic_steps:
                run.evaluate(agent.act, buffer, progress.evaluations)  # step 4: acting, here or in a worker process
            progress.checkpoint(step)  # every `checkpoint_every` updates and at the round's end
        if round_ + 1 < config.planning_rounds:  # plan, then restart the critic from its initial weights
            planned = plan(critic, buffer, cache, rewards, ends, progress.return_mean, progress.return_std, config)
            critic_trainer.reset()
            progress.planned(round_ + 1, *planned)  # logged and checkpointed
    return finish_run(run, {**progress.results(), "planning_rounds": config.planning_rounds,
                            "critic_steps": config.critic_steps, "select_count": select_count,
                            "behavior_steps_per_s": behavior_rate, "candidate_actions_per_s": candidate_rate})


# ==== SfBC extras: its settings' checks, the behaviour phase's and the planning phase's bookkeeping (resume,
# checkpoints, logged losses, rates) ====


def check_sfbc_config(config: TrainConfig) -> None:
    """SfBC's own settings (the shared ones are checked by `check_config`): one error line each."""
    problems = [
        (not config.score_widths or min(config.score_widths) < 1, "--score_widths must be positive widths"),
        (config.solver_order not in (1, 2, 3), "--solver_order must be 1, 2 or 3"),
        (config.solver_steps < 1, "--solver_steps must be at least 1"),
        (not 0.0 < config.solver_t_end < 1.0, "--solver_t_end must lie in (0, 1)"),
        (config.planning_rounds < 1 or config.critic_steps < 1, "--planning_rounds and --critic_steps must be >= 1"),
        (config.planning_candidates < 1 or config.eval_candidates < 1, "candidate counts must be at least 1"),
        (config.planning_states is not None and config.planning_states < 1, "--planning_states must be at least 1"),
        (config.select_count is not None and not 1 <= config.select_count <= config.eval_candidates,
         "--select_count must lie in [1, --eval_candidates]"),
        (config.sampler_batch < 1, "--sampler_batch must be at least 1"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


class BehaviorProgress:
    """Step 1's bookkeeping for `train_behavior`: resume from a behaviour checkpoint (nothing to do once
    RUN_DIR/behavior.pt exists), the logged loss (summed on the device: no sync per step), a checkpoint every
    `checkpoint_every` (default `eval_every`) steps and at the end, RUN_DIR/behavior.pt, the steps per second."""

    def __init__(self, run: "Run", trainer: BehaviorTrainer):
        self.run, self.trainer, self.config = run, trainer, run.config
        self.done, self.first, self.busy = (run.dir / "behavior.pt").exists(), 0, 0.0
        self.loss, self.since_log = torch.zeros((), device=self.config.device), 0

    @classmethod
    def start(cls, run: "Run", trainer: BehaviorTrainer) -> "BehaviorProgress":
        progress, checkpoint = cls(run, trainer), run.checkpoint
        if not progress.done:
            run.phase = "behavior"
            run.checkpoint_state = lambda: {"behavior": trainer.state_dict()}  # a polite stop checkpoints any step
            if checkpoint is not None and checkpoint["phase"] == "behavior":
                trainer.load_state_dict(checkpoint["behavior"])
                progress.first = checkpoint["step"]
                set_rng_state(checkpoint["rng"])  # the resumed run draws the batches the uninterrupted one would
        return progress

    def steps(self, total: int):
        if not self.done:
            yield from self.run.steps(self.first, total, "1. behaviour model")

    def add(self, update: Callable[[], torch.Tensor]) -> None:
        tick = time.perf_counter()
        self.loss += update()
        self.busy += time.perf_counter() - tick
        self.since_log += 1
        run, config, step = self.run, self.config, self.run.step
        if step % config.log_every == 0:
            run.logger.log({"behavior/loss": self.loss.item() / self.since_log}, step, "behavior")
            self.loss, self.since_log = self.loss.zero_(), 0
        if step % (config.checkpoint_every or config.eval_every) == 0 or step == config.train_steps:
            run.save_checkpoint({"behavior": self.trainer.state_dict()})

    def frozen_model(self, buffer: "ReplayBuffer") -> ScoreNetwork:
        """The model of RUN_DIR/behavior.pt (written here after training), and the RNG state after step 1."""
        model, path = self.trainer.model, self.run.dir / "behavior.pt"
        if not self.done:
            save_atomic({"model": model.state_dict(), "sizes": model.describe(), "rng": rng_state(),
                         "state_mean": torch.from_numpy(buffer.state_mean),
                         "state_std": torch.from_numpy(buffer.state_std)}, path)
        saved = torch_load(path)
        model.load_state_dict(saved["model"])
        set_rng_state(saved["rng"])  # a resumed run continues as the uninterrupted one after step 1
        return model.eval().requires_grad_(False)

    def rate(self) -> Optional[float]:
        return (self.config.train_steps - self.first) / self.busy if self.busy > 0 else None


def cached_candidates(run: "Run") -> dict:
    """RUN_DIR/candidates.pt of a resumed run, and the RNG state after it (the uninterrupted run's)."""
    cache = torch_load(run.dir / "candidates.pt")
    set_rng_state(cache["rng"])
    return cache


class PlanningProgress:
    """Step 3's bookkeeping for `train`: the critic's targets (normalised, [N, 1] on the device) with their mean and
    std, the round and its last critic update done, the evaluations. A resumed run continues from them
    (`Run.resume_agent`: evaluations still pending in a worker too); checkpoints every `checkpoint_every` (default
    `eval_every`) critic updates, at every round's end and after every planning step."""

    def __init__(self, run: "Run", trainer: CriticTrainer):
        self.run, self.trainer, self.config = run, trainer, run.config
        self.round, self.round_step, self.evaluations = 0, 0, []

    @classmethod
    def start(cls, run: "Run", trainer: CriticTrainer, buffer: "ReplayBuffer", rewards: np.ndarray,
              ends: np.ndarray) -> "PlanningProgress":
        progress = cls(run, trainer)
        if run.checkpoint is None or run.checkpoint["phase"] != "rl":  # round 0: the Monte-Carlo returns
            progress.set_targets(*normalize_returns(planned_returns(rewards, ends, run.config.gamma)))
            run.logger.log({"planning/return_mean": progress.return_mean,
                            "planning/return_std": progress.return_std}, 0)
        _, progress.evaluations = run.resume_agent(progress, buffer, run.checkpoint)  # load_state_dict if resumed
        progress.state = run.checkpoint_state  # the checkpoint's contents; Run.steps forgets it at a round's end
        return progress

    def set_targets(self, targets: np.ndarray, mean: float, std: float) -> None:
        self.targets = torch.as_tensor(targets, device=self.config.device)[:, None]  # [N, 1]
        self.return_mean, self.return_std = mean, std

    def steps(self, round_: int):
        """The round's critic updates 1 .. critic_steps after the last one done; run.step counts over all rounds."""
        offset, self.run.checkpoint_state = round_ * self.config.critic_steps, self.state
        for step in self.run.steps(offset + self.round_step, offset + self.config.critic_steps,
                                   f"3. critic, round {round_ + 1}"):
            yield step - offset

    def checkpoint(self, step: int) -> None:
        self.round_step = step
        if step % (self.config.checkpoint_every or self.config.eval_every) == 0 or step == self.config.critic_steps:
            self.run.save_checkpoint(self.state())

    def planned(self, round_: int, targets: np.ndarray, mean: float, std: float, v_won: float) -> None:
        """A planning step's new targets for round `round_` (logged, checkpointed)."""
        self.set_targets(targets, mean, std)
        self.round, self.round_step = round_, 0
        self.run.logger.log({"planning/return_mean": mean, "planning/return_std": std,
                             "planning/v_won_fraction": v_won}, self.run.step)
        self.run.note(f"planning step {round_}: V(s) raised the target at {100 * v_won:.1f}% of the states")
        self.run.save_checkpoint(self.state())

    def state_dict(self) -> dict:
        return {"round": self.round, "round_step": self.round_step, "critic": self.trainer.state_dict(),
                "targets": self.targets[:, 0].cpu(), "return_mean": self.return_mean, "return_std": self.return_std}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["critic"])
        self.set_targets(state["targets"].numpy(), state["return_mean"], state["return_std"])
        self.round, self.round_step = state["round"], state["round_step"]

    def results(self) -> dict:
        self.run.collect(self.evaluations, keep=0)  # the evaluations still in a worker
        seconds, updates = self.run.update_time, self.config.planning_rounds * self.config.critic_steps
        return {**summarize(self.evaluations), "critic_updates_per_s": updates / seconds if seconds else None}


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
