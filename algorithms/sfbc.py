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
`checkpoint_every` critic updates, at the end of every round and after every planning step; `--resume RUN_DIR`
continues any phase bit-for-bit (tests/test_sfbc.py stops runs in each phase).

Cost at the official sizes on one H200 (tests/benchmarks/throughput.py): 199 behaviour steps/s eager, 529 with
`--compile` (586k steps: about 18 minutes); 0.76M candidate actions/s (2.2M with `--amp`: a 1M-state dataset's
16M candidates in 7 to 21 s); 2 x 24.5k critic updates at about 960/s; one evaluation step (32 candidates for
each of 10 states) 14.7 ms eager, 6.8 ms with `--compile`, so a 1000-step evaluation takes 7 to 15 s.

Data sources (`--env`, `--dataset_path`, bundled `*-gymv5` datasets), state normalisation and evaluation are
cnf.py's (copied blocks; see cnf.py's docstring).

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
  by --seed (official: 10 while training the critic, seeded seed + 1001 + i).
- `--amp`: bfloat16 matmuls in the hidden layers of the score network and the critic (output layers float32).
  `--compile`: the behaviour step, the critic update and the whole acting step (15 solver evaluations, critic,
  selection) go through torch.compile (CUDA graphs on a GPU); candidate generation stays eager (it is
  compute-bound).
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
from dataclasses import asdict, dataclass
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
    # --- schedule (the experiment's shared fields follow) ---
    train_steps: int = 586_000  # behaviour-model steps (official: 600 epochs of 4M samples at batch 4096)
    batch_size: int = 4096  # batch of the behaviour model and of the critic (official: 4096 both)
    eval_every: int = 5_000  # critic updates between evaluations (and at the end of every planning round)
    # ---- [block: experiment config | copied from cnf.py] ----
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
    # ---- [end block: experiment config] ----


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


def train_behavior(config: TrainConfig, buffer: "ReplayBuffer", trainer: BehaviorTrainer,
                   run: "Run") -> Optional[float]:
    """Step 1 for `train_steps` steps, checkpointed every `eval_every`; writes RUN_DIR/behavior.pt.
    Returns the steps per second of this process (None if it ran none)."""
    from tqdm import trange

    start, run.phase = 0, "behavior"
    if run.checkpoint is not None and run.checkpoint["phase"] == "behavior":
        trainer.load_state_dict(run.checkpoint["behavior"])
        start = run.checkpoint["step"]
        set_rng_state(run.checkpoint["rng"])  # the resumed run draws the batches the uninterrupted one would

    def behavior_step() -> torch.Tensor:
        idx = torch.randint(0, buffer.size, (config.batch_size,), device=buffer.device)
        return trainer.train(buffer.states[idx], buffer.actions[idx])["behavior/loss"]

    update = compiled(behavior_step, config)
    loss, since_log, busy = torch.zeros((), device=config.device), 0, 0.0  # summed on the device: no sync per step
    for step in trange(start + 1, config.train_steps + 1, desc="1. behaviour model", initial=start,
                       total=config.train_steps, mininterval=5):
        run.step = step
        tick = time.perf_counter()
        loss += update()
        busy += time.perf_counter() - tick
        since_log += 1
        if step % config.log_every == 0:
            run.logger.log({"behavior/loss": loss.item() / since_log}, step, "behavior")
            loss, since_log = loss.zero_(), 0
        if step % (config.checkpoint_every or config.eval_every) == 0 or step == config.train_steps:
            run.save_checkpoint({"behavior": trainer.state_dict()})
    save_atomic({"model": trainer.model.state_dict(), "sizes": trainer.model.describe(), "rng": rng_state(),
                 "state_mean": torch.from_numpy(buffer.state_mean), "state_std": torch.from_numpy(buffer.state_std)},
                run.dir / "behavior.pt")
    return (config.train_steps - start) / busy if busy > 0 else None


def generate_candidates(config: TrainConfig, buffer: "ReplayBuffer", behavior: ScoreNetwork, sde: VPSDE,
                        run: "Run") -> Tuple[dict, float]:
    """Step 3's cache: `planning_candidates` behaviour actions for every planning state, in sampler passes of
    `sampler_batch` actions; written to RUN_DIR/candidates.pt. -> (cache, candidate actions per second)."""
    from tqdm import tqdm

    set_rng_state(torch_load(run.dir / "behavior.pt")["rng"])  # as the uninterrupted run after step 1
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
    from tqdm import trange

    check_sfbc_config(config)
    data = load_offline_data(config)
    run = start_run(config, data)
    buffer = ReplayBuffer(data, config.device)
    state_dim, action_dim = buffer.states.shape[1], buffer.actions.shape[1]
    sde = VPSDE(config.beta_min, config.beta_max)
    rates = {"behavior_steps_per_s": None, "candidate_actions_per_s": None, "critic_updates_per_s": None}

    # Step 1: the behaviour model (skipped once RUN_DIR/behavior.pt exists).
    behavior = ScoreNetwork(action_dim, state_dim, config.score_widths, config.amp).to(config.device)
    if not (run.dir / "behavior.pt").exists():
        rates["behavior_steps_per_s"] = train_behavior(config, buffer, BehaviorTrainer(behavior, sde, config), run)
    behavior.load_state_dict(torch_load(run.dir / "behavior.pt")["model"])
    behavior.eval().requires_grad_(False)

    # Step 3's cache: behaviour candidates for the dataset states, sampled once (skipped once candidates.pt exists).
    if (run.dir / "candidates.pt").exists():
        cache = torch_load(run.dir / "candidates.pt")
    else:
        cache, rates["candidate_actions_per_s"] = generate_candidates(config, buffer, behavior, sde, run)

    # Step 3: in-sample planning; round 0 fits the Monte-Carlo returns, every later round planned targets.
    rewards, ends = data.rewards, episode_ends(data)
    resumed = run.checkpoint if run.checkpoint is not None and run.checkpoint["phase"] == "rl" else None
    run.phase = "rl"  # the RL phase of the shared plumbing: logs and checkpoints count critic updates
    if resumed is None:
        set_rng_state(cache["rng"])  # as the uninterrupted run after the cache
    critic = Critic(state_dim, action_dim, config.critic_hidden, config.amp).to(config.device)
    critic_trainer = CriticTrainer(critic, config)
    select_count = config.select_count or (4 if LOCOMOTION_NAME.match(data.name) else 1)
    agent = SfBC(behavior, critic, sde, config, select_count)
    act = compiled(agent.act, config)  # --compile: a whole acting step (solver, critic, selection) as one graph
    if resumed is None:
        targets, return_mean, return_std = normalize_returns(planned_returns(rewards, ends, config.gamma))
        round_start, step_start, evaluations, critic_time = 0, 0, [], 0.0
        run.logger.log({"planning/return_mean": return_mean, "planning/return_std": return_std}, 0)
    else:
        critic_trainer.load_state_dict(resumed["critic"])
        targets, return_mean, return_std = resumed["targets"].numpy(), resumed["return_mean"], resumed["return_std"]
        round_start, step_start, critic_time = resumed["round"], resumed["round_step"], resumed["critic_time_s"]
        evaluations = [tuple(e) for e in resumed["evaluations"]]
        set_rng_state(resumed["rng"])
    targets_device = torch.as_tensor(targets, device=config.device)[:, None]  # [N, 1]

    def save(round_: int, round_step: int) -> None:
        run.save_checkpoint({"round": round_, "round_step": round_step, "critic": critic_trainer.state_dict(),
                             "targets": torch.from_numpy(targets), "return_mean": return_mean,
                             "return_std": return_std, "evaluations": evaluations, "critic_time_s": critic_time})

    def critic_step() -> Dict[str, torch.Tensor]:
        idx = torch.randint(0, buffer.size, (config.batch_size,), device=buffer.device)
        return critic_trainer.train(buffer.states[idx], buffer.actions[idx], targets_device[idx])

    update = compiled(critic_step, config)
    for round_ in range(round_start, config.planning_rounds):
        offset = round_ * config.critic_steps  # steps count critic updates over all rounds
        for step in trange(step_start + 1, config.critic_steps + 1, desc=f"3. critic, round {round_ + 1}",
                           initial=step_start, total=config.critic_steps, mininterval=5):
            run.step = offset + step
            tick = time.perf_counter()
            metrics = update()
            critic_time += time.perf_counter() - tick
            if step % config.log_every == 0:
                run.logger.log({k: v.item() for k, v in metrics.items()}, run.step)
            if step % config.eval_every == 0 or step == config.critic_steps:
                evaluations.append((run.step, run.evaluate(act, buffer)))  # step 4: acting
            if step % (config.checkpoint_every or config.eval_every) == 0 or step == config.critic_steps:
                save(round_, step)
        step_start = 0
        if round_ + 1 < config.planning_rounds:  # plan, then restart the critic from its initial weights
            targets, return_mean, return_std, v_won = plan(critic, buffer, cache, rewards, ends, return_mean,
                                                           return_std, config)
            targets_device = torch.as_tensor(targets, device=config.device)[:, None]
            critic_trainer.reset()
            run.logger.log({"planning/return_mean": return_mean, "planning/return_std": return_std,
                            "planning/v_won_fraction": v_won}, run.step)
            run.note(f"planning step {round_ + 1}: V(s) raised the target at {100 * v_won:.1f}% of the states")
            save(round_ + 1, 0)
    rates["critic_updates_per_s"] = config.planning_rounds * config.critic_steps / critic_time if critic_time else None
    return finish_run(run, {**summarize(evaluations), "planning_rounds": config.planning_rounds,
                            "critic_steps": config.critic_steps, "select_count": select_count, **rates})


# ==== Plumbing shared by every algorithm file (copied from cnf.py; tests/test_copies.py keeps it identical) ====
# Nothing below is part of the algorithm: data sources, evaluation, checkpoints, logging, config parsing.


# ---- [block: d4rl names | copied from cnf.py] ----
D4RL_LOCOMOTION = re.compile(r"^(halfcheetah|hopper|walker2d)-"
                             r"(random|medium|medium-replay|medium-expert|expert|full-replay)-v2$")
D4RL_MAZE2D = re.compile(r"^maze2d-(umaze|medium|large)-v1$")


def d4rl_filename(name: str) -> str:
    """The file name d4rl caches a dataset under (the basename of its URL)."""
    if D4RL_MAZE2D.match(name):
        return name.replace("-v1", "-sparse-v1") + ".hdf5"
    env, level = name[: -len("-v2")].split("-", 1)
    return f"{env}_{level.replace('-', '_')}-v2.hdf5"
# ---- [end block: d4rl names] ----


# ---- [block: d4rl scores | copied from cnf.py] ----
D4RL_REF_SCORES = {  # D4RL's (random, expert) returns: normalised score = 100 (R - min) / (max - min)
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3),
    "maze2d-umaze": (23.85, 161.86), "maze2d-medium": (13.13, 277.39), "maze2d-large": (6.7, 273.99),
}
GYMNASIUM_IDS = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
# ---- [end block: d4rl scores] ----


# ---- [block: data | copied from cnf.py] ----
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
# ---- [end block: data] ----


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
# ---- [end block: evaluation] ----


# ---- [block: utilities | copied from cnf.py] ----
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
# ---- [end block: utilities] ----


if __name__ == "__main__":
    main(train, TrainConfig)
