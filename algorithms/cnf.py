"""Conservative Normalizing Flows (CNF): offline RL in the bounded latent space of a normalizing flow.

Companion to Akimov et al., "Let Offline RL Flow: Training Conservative Agents in the Latent Space
of Normalizing Flows" (arXiv 2211.11096): Table 1 and Fig. 4 (CNF column).

    python algorithms/cnf.py --env halfcheetah-medium-v2                 # D4RL (Docker image)
    python algorithms/cnf.py --config_path algorithms/configs/cnf/quick.yaml   # CPU quick preset
    python algorithms/cnf.py --dataset_path FILE.hdf5 --eval_env Hopper-v4      # any D4RL-format file
    python algorithms/cnf.py --env halfcheetah-medium-v2 --seeds 0 1 2   # 3 seeds, one process, one flow (SeedCNF)

Phase 1 (Algorithm 1, Eq. 5): fit a conditional flow a = f^-1(z | s) to the dataset's actions by
maximum likelihood; its first layer is atanh, its last tanh, its base Uniform(-1, 1)^n, so every
latent in the box decodes to an in-distribution action. Keep the best flow on a 10% validation
split and freeze it. Phase 2 (Algorithm 2, Eqs. 6-8): a tanh-Gaussian latent policy pi(z | s) and
twin critics on real actions, trained with advantage weighting through the frozen flow.

The mechanism, measured (`BehaviourLikelihood`): at every evaluation, on 10k dataset states fixed by the
seed, the frozen flow scores the policy's evaluation actions: `diag/policy_nll` (mean -log pi_beta(a | s))
beside the data's own `diag/data_nll`, `diag/ood_rate` (the fraction below the data's 1st-percentile
log-likelihood; about 1% for data-like actions) and `diag/latent_abs_max`, with per-dimension latent
histograms in RUN_DIR/latent_histograms.jsonl. It draws nothing from the training's random streams: the
scores are bitwise those of a run without it. `algorithms/behavior_likelihood.py` scores any finished run.

Choices where the paper and the official code (tinkoff-ai/cnf) are silent or where we deviate:
- Invertible linear layers are LU-parametrised (Glow), so they stay invertible and their log-det is
  sum(log|s|); the official code inverts the matrix and takes slogdet on the CPU at every call. For
  phase 2 the frozen flow's constants are computed once (`ConditionalFlow.freeze`): each block's
  linear^-1 and ActNorm^-1 fused into one affine map, all blocks' state features in one matmul.
- Odd action dimensions: couplings keep floor(n/2) and transform ceil(n/2) dims (no zero padding).
- tanh's log-derivative is the stable 2 (log 2 - h - softplus(-2h)), not log(1 - tanh(h)^2) of a clamp.
- States are normalised once, in the replay buffer (CORL), not inside every network; mean and std
  (std + 1e-3) travel with every checkpoint, and evaluation normalises observations the same way.
- Phase 2 update: one latent sample z ~ pi(.|s) serves both the advantage baseline Q(s, f^-1(z|s))
  and the L1 policy loss, as Eqs. 7-8 are written; the official code draws a second sample and a
  second flow pass for the baseline. The two critics are one vectorised ensemble with one Adam
  (identical to two critics with two Adams: Adam is element-wise).
- Actions more than 1e-4 outside [-1, 1] are refused (atanh is defined inside the box); closer ones are clipped.
- Flow pre-training samples batches with replacement for `flow_steps` steps (the official code
  runs epochs of a DataLoader); validation NLL every `flow_eval_every` steps decides the kept flow.
- Evaluation acts deterministically, a = f^-1(tanh(mu(s)) | s). The paper does not say; the official
  `evaluate` never switches the actor to eval mode, so it samples z ~ pi(. | s) while evaluating.

Reading order: config, flow (Eq. 5), latent policy, phase 1, phase 2 (`CNF.train`), the diagnostic, the loop, several
seeds in one process (`SeedCNF`); then, below one banner, the plumbing every file shares. tests/test_copies.py checks
the `[block: ...]` copies.
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
import shutil
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

ALGORITHM = "cnf"
BASE_DISTRIBUTION = "uniform"  # of the flow's latent; written to flow.pt and checked by --flow_checkpoint


@dataclass
class TrainConfig:
    # --- phase 1: flow pre-training (Algorithm 1, Eq. 5; Table 3) ---
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
    flow_patience: int = 0  # stop phase 1 after this many evaluations without a better validation NLL (0: off)
    # --- phase 2: RL in the latent space (Algorithm 2, Eqs. 6-8; Table 2) ---
    hidden_dim: int = 256  # actor and critic width
    n_layers: int = 4  # linear layers in actor and critics (paper: {3, 4})
    actor_lr: float = 3e-4  # policy learning rate
    critic_lr: float = 3e-4  # critic learning rate
    gamma: float = 0.99  # discount
    tau: float = 2e-3  # Polyak rate of the target critics
    awac_lambda: float = 1.0 / 3.0  # temperature lambda of exp(A / lambda) (maze2d: 1/10)
    exp_adv_max: float = 100.0  # clamp of the advantage weights (official code)
    # --- schedule ---
    train_steps: int = 1_000_000  # phase-2 gradient updates (paper: 1M; HalfCheetah 200k)
    seeds: Optional[List[int]] = None  # several seeds in one process over one flow, a run directory each (SeedCNF)
    batch_size: int = 512  # phase-2 batch size (paper: {256, 512, 1024}; maze2d 10240)
    eval_every: int = 5_000  # updates between evaluations
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


# %% Networks: the MLPs and twin critics every file shares, then the flow (Eq. 5)
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

    def encode(self, x: torch.Tensor, cond: torch.Tensor, initialize: bool = False) -> Tuple[torch.Tensor, ...]:
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


class ConditionalFlow(nn.Module):
    """The CNF flow f(a | s): data -> latent is atanh -> K x FlowBlock -> tanh, base Uniform(-1, 1)^n.
    `encode` is f (with log|det|), `decode` is f^-1 (no log-det needed). States come normalised.
    With `amp`, only the conditioners' matmuls run in bfloat16; the invertible path stays float32."""

    def __init__(self, action_dim: int, state_dim: int, n_blocks: int, hidden: int, amp: bool = False):
        super().__init__()
        self.action_dim, self.state_dim, self.n_blocks, self.hidden = action_dim, state_dim, n_blocks, hidden
        self.amp = amp
        self.blocks = nn.ModuleList(FlowBlock(action_dim, state_dim, hidden, keep_first=i % 2 == 0, amp=amp)
                                    for i in range(n_blocks))

    def encode(self, actions: torch.Tensor, states: torch.Tensor,
               initialize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """z = f(a | s) and log|det df/da|; `initialize` runs ActNorm's data-dependent init."""
        a = actions.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)
        h = torch.atanh(a)
        log_det = -torch.log1p(-a * a).sum(-1)
        for block in self.blocks:
            h, block_log_det = block.encode(h, states, initialize)
            log_det = log_det + block_log_det
        return torch.tanh(h), log_det + tanh_log_derivative(h).sum(-1)

    def log_prob(self, actions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Eq. 5: log pi_beta(a | s) = log p_Z(f(a | s)) + log|det df/da|; p_Z = Uniform(-1, 1)^n."""
        _, log_det = self.encode(actions, states)
        return log_det - self.action_dim * math.log(2.0)

    def decode(self, latents: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """a = f^-1(z | s) for latents in the box; the result lies inside (-1, 1)^n."""
        h = torch.atanh(latents.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS))
        for block in reversed(self.blocks):
            h = block.decode(h, states)
        return torch.tanh(h).clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)

    def describe(self) -> dict:
        return {"action_dim": self.action_dim, "state_dim": self.state_dim,
                "n_blocks": self.n_blocks, "hidden": self.hidden}


class LatentPolicy(nn.Module):
    """pi(z | s) = tanh(N(mu(s), sigma(s))), log sigma clamped to [-20, 2]; acting uses tanh(mu)."""

    def __init__(self, state_dim: int, latent_dim: int, hidden: int, n_layers: int, amp: bool = False):
        super().__init__()
        self.net, self.amp = mlp(state_dim, 2 * latent_dim, hidden, n_layers), amp

    def mean_log_std(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            mean, log_std = self.net(states).float().chunk(2, dim=-1)
        return mean, log_std.clamp(-20.0, 2.0)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """A reparameterised sample z (gradients flow to mu and sigma)."""
        mean, log_std = self.mean_log_std(states)
        return torch.tanh(mean + log_std.exp() * torch.randn_like(mean))

    def deterministic(self, states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mean_log_std(states)[0])


# %% Phase 1: flow pre-training (Algorithm 1)
class FlowPretrainer:
    """Maximum likelihood (Eq. 5) with AdamW and gradient-norm clipping; one `train` call = one step."""

    def __init__(self, flow: ConditionalFlow, config: TrainConfig):
        self.flow, self.config = flow, config
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.optimizer = torch.optim.AdamW(flow.parameters(), lr=config.flow_lr, weight_decay=config.flow_weight_decay,
                                           fused=fused)

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


# %% Phase 2: RL in the latent space (Algorithm 2)
class CNF:
    """Latent policy and twin critics trained through the frozen flow; `train(batch)` is one update."""

    def __init__(self, flow: ConditionalFlow, state_dim: int, action_dim: int, config: TrainConfig):
        self.flow = FrozenFlow(flow)  # f^-1 with no gradients into the flow, its constants computed once (below)
        self.config = config
        self.actor = LatentPolicy(state_dim, action_dim, config.hidden_dim, config.n_layers, config.amp)
        self.actor.to(config.device)
        self.critic = TwinCritic(state_dim, action_dim, config.hidden_dim, config.n_layers, config.amp)
        self.critic.to(config.device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=fused)

    def critic_loss(self, batch: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6: y = r + gamma (1 - d) min_i Q_i'(s', f^-1(z' | s')), z' ~ pi(. | s'); MSE of Q1 plus MSE of Q2."""
        states, actions, rewards, next_states, dones = batch
        with torch.no_grad():
            next_actions = self.flow.decode(self.actor(next_states), next_states)
            next_q = self.target_critic(next_states, next_actions).min(0).values  # [B, 1]
            target = rewards + self.config.gamma * (1.0 - dones) * next_q
        q = self.critic(states, actions)  # [2, B, 1]
        return ((q - target) ** 2).mean(dim=(1, 2)).sum(), q

    def actor_loss(self, batch: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 7-8: advantage-weighted L1 distance between the data's actions and the policy's decoded ones."""
        states, actions = batch[0], batch[1]
        # The policy's action, decoded through the frozen flow with gradients to the policy.
        policy_actions = self.flow.decode(self.actor(states), states)  # [B, act_dim]
        # Eq. 7, advantage A(s, a) = Q(s, a) - Q(s, f^-1(z | s)), Q = min(Q1, Q2), with the updated
        # critics, both actions in one batched pass.
        with torch.no_grad():
            both = self.critic(torch.cat([states, states]), torch.cat([actions, policy_actions]))
            q_data, q_policy = both.min(0).values.chunk(2)  # [B, 1] each
            weights = torch.exp((q_data - q_policy) / self.config.awac_lambda).clamp(max=self.config.exp_adv_max)
        # Eq. 8, policy loss: the weights times the L1 distance, averaged over the batch.
        return (weights * (actions - policy_actions).abs()).mean(), weights

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        """One step of Algorithm 2: the critics (Eq. 6), then the policy against the updated critics (Eqs. 7-8),
        then Polyak averaging of the target critics."""
        critic_loss, q = self.critic_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        actor_loss, weights = self.actor_loss(batch)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        with torch.no_grad():  # target <- (1 - tau) target + tau critic, one fused op
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()),
                                 self.config.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(),
                "q_mean": q.detach().mean(), "adv_weight_mean": weights.mean()}

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Evaluation: a = f^-1(tanh(mu(s)) | s)."""
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


# %% The loop: phase 1's, phase 2's, and train(config) that runs both
def pretrain_flow(config: TrainConfig, buffer: "ReplayBuffer", run: "Run") -> ConditionalFlow:
    """Phase 1: maximum likelihood on 90% of the data, validation NLL on the rest every `flow_eval_every` steps;
    returns the best-validation flow (also written to RUN_DIR/flow.pt)."""
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(buffer.size, generator=generator).to(config.device)
    n_valid = max(1, int(config.flow_valid_fraction * buffer.size))
    valid, train = order[:n_valid], order[n_valid:]
    flow = ConditionalFlow(buffer.actions.shape[1], buffer.states.shape[1], config.flow_layers,
                           config.flow_hidden, config.amp).to(config.device)
    trainer = FlowPretrainer(flow, config)
    progress = FlowProgress.start(run, trainer)  # a resumed run continues from its checkpoint (below)
    if progress.step == 0:  # ActNorm's data-dependent initialisation on a first batch
        first = train[torch.randint(0, len(train), (config.flow_batch_size,), device=config.device)]
        flow.encode(buffer.actions[first], buffer.states[first], initialize=True)

    def flow_step() -> torch.Tensor:
        idx = train[torch.randint(0, len(train), (config.flow_batch_size,), device=config.device)]
        return trainer.train(buffer.actions[idx], buffer.states[idx])["flow/train_nll"]

    update = compiled(flow_step, config)
    for step in progress.steps(config.flow_steps):  # ends early after `flow_patience` evaluations without a gain
        progress.add(update())
        if step % config.flow_eval_every == 0 or step == config.flow_steps:
            progress.validated(trainer.validation_nll(buffer.actions[valid], buffer.states[valid]))
    return progress.best_flow(lambda: trainer.validation_nll(buffer.actions[valid], buffer.states[valid]), buffer)


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
    """Phase 1 (or a saved flow), phase 2, evaluations, checkpoints; returns the results.json path.
    Two or more --seeds: `train_seeds` (below)."""
    seeds = checked_seeds(config)
    if len(seeds) > 1:
        return train_seeds(config, seeds)
    config = replace(config, seed=seeds[0])
    data = load_offline_data(config)
    run = start_run(config, data)
    buffer = ReplayBuffer(data, config.device)
    flow, checkpoint = flow_for_phase_2(config, buffer, run)  # phase 1, or its flow.pt (below)
    agent = CNF(flow, buffer.states.shape[1], buffer.actions.shape[1], config)
    diagnostic = BehaviourLikelihood(agent.flow, buffer.states, buffer.actions, config.seed)  # Figs. 3, 5, 6
    results = train_agent(agent, buffer, run, checkpoint, desc="phase 2: RL",
                          diagnose=diagnostic.hook(latent_policy(agent), run))
    return finish_run(run, {**results, "flow_best_valid_nll": best_flow_nll(run.dir)})


# ==== CNF extras: the frozen decoder's fast path, the behaviour-likelihood diagnostic (Figs. 3, 5, 6), phase 1's
# bookkeeping and result, several seeds in one process (`--seeds`) ====


class FrozenFlow(nn.Module):
    """Phase 2's flow: the trained ConditionalFlow with no gradients into it, and every constant of f^-1 computed
    once (the official code inverts each linear layer and takes slogdet on the CPU at every call). Each block's
    linear^-1 and ActNorm^-1 become one affine map, all blocks' state features one matmul per batch, the frozen
    PReLUs leaky ReLUs. `decode` equals ConditionalFlow.decode (tests/conftest.py checks values and gradients);
    `encode` and `log_prob` are the flow's. Build it after moving the flow to its device; the constants are not
    part of any state_dict."""

    @torch.no_grad()
    def __init__(self, flow: ConditionalFlow):
        super().__init__()
        self.flow = flow.requires_grad_(False).eval()
        self.blocks, self.n_blocks, self.hidden = flow.blocks, flow.n_blocks, flow.hidden
        self.matmul_dtype = torch.bfloat16 if flow.amp else flow.blocks[0].actnorm.shift.dtype
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
                # PReLU with a frozen (single) slope is a leaky ReLU, whose backward is one cheap kernel
                "slope_1": prelu_1.weight.item(), "slope_2": prelu_2.weight.item(),
                "weight_2": low(second.weight.T.contiguous()), "bias_2": low(second.bias),
                "weight_3": low(last.weight.T.contiguous()), "bias_3": low(last.bias),
                "neg_rescale": -block.coupling.rescale,
            })
        # The state's contribution to every block's first conditioner layer, for one matmul per batch.
        self.state_weight = low(torch.cat([b.coupling.conditioner[0].weight[:, b.coupling.n_keep:]
                                           for b in self.blocks]).T.contiguous())  # [state_dim, K * hidden]
        self.state_bias = low(torch.cat([b.coupling.conditioner[0].bias for b in self.blocks]))

    def encode(self, actions: torch.Tensor, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.flow.encode(actions, states)

    def log_prob(self, actions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(actions, states)

    def decode(self, latents: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """ConditionalFlow.decode, a = f^-1(z | s), through `decode_blocks`."""
        h = torch.atanh(latents.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS))
        return torch.tanh(self.decode_blocks(h, states)).clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)

    def decode_blocks(self, h: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The K blocks' `decode`, computed from the constants (tests check they agree). Rows may come in
        leading dims ([..., B, n]): they are decoded as one batch of rows."""
        shape, h, states = h.shape, h.flatten(0, -2), states.flatten(0, -2)
        state_features = torch.addmm(self.state_bias, states.to(self.matmul_dtype), self.state_weight)
        state_features = state_features.view(len(states), self.n_blocks, self.hidden).unbind(1)
        for block, const, features in zip(reversed(self.blocks), reversed(self.frozen), reversed(state_features)):
            coupling = block.coupling
            kept, transformed = coupling.split(h)
            kept_low = kept.to(self.matmul_dtype)
            hidden = torch.addmm(features, kept_low, const["kept_weight"]) if coupling.n_keep else features
            hidden = self.leaky_relu(torch.addmm(const["bias_2"], self.leaky_relu(hidden, const["slope_1"]),
                                                 const["weight_2"]), const["slope_2"])
            raw_log_scale, shift = torch.addmm(const["bias_3"], hidden, const["weight_3"]).float().chunk(2, dim=-1)
            transformed = (transformed - shift) * torch.exp(const["neg_rescale"] * torch.tanh(raw_log_scale))
            h = torch.addmm(const["affine_bias"], coupling.join(kept, transformed), const["affine_weight"])
        return h.view(shape)

    @staticmethod
    def leaky_relu(x: torch.Tensor, slope: float) -> torch.Tensor:
        """A PReLU with its frozen slope. Eager: F.leaky_relu, one kernel each way. Under torch.compile the same
        function as max(x, slope x) (min for a slope above 1): Inductor's CPU code for leaky_relu saves a bool
        mask for the backward pass, whose store costs 15-20 ns per element with AVX2 (torch 2.13), which made the
        compiled update slower than the eager one; the max form keeps floats (tests/benchmarks/inductor_mask.py)."""
        if not torch.compiler.is_compiling():
            return F.leaky_relu(x, slope)
        return torch.maximum(x, slope * x) if slope <= 1.0 else torch.minimum(x, slope * x)


# Latent histogram bins: 20 of width 0.1 over the box [-1, 1], coarser ones beyond it (the Normal
# policy's latents are unbounded); counts have len(LATENT_EDGES) + 1 bins, the first (z < -4) and the
# last (z >= 4) open. A latent in the closed box [-1, 1] counts inside it (clamped as f^-1 clamps it).
LATENT_EDGES = (-4.0, -3.0, -2.0, -1.5, *(round(-1.0 + 0.1 * i, 1) for i in range(21)), 1.5, 2.0, 3.0, 4.0)


def latent_policy(agent) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """A flow agent's evaluation policy with its latents: states -> (a = f^-1(z | s), z), z the actor's
    deterministic latent; the actions are exactly `agent.act`'s."""
    def policy(states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        latents = agent.actor.deterministic(states)
        return agent.flow.decode(latents, states), latents

    return policy


class BehaviourLikelihood:
    """How far a policy's evaluation actions stray from the data, measured by the frozen behaviour flow.

    The paper's argument (Figs. 3, 5, 6) is about support: every latent in CNF's box decodes to an action
    the data could have produced, while a Normal-latent policy can push f^-1 to actions the data never had.
    A flow fitted to the data is a density of its actions, log pi_beta(a | s) = log p_Z(f(a | s)) +
    log|det df/da| (Eq. 5): exact (a VAE gives only a bound), defined at every (s, a) in the action box, and
    its own log-likelihood of the data is what phase 1 maximised. So it is the yardstick: an action is in
    distribution when pi_beta gives it as much density as the data's own actions get at the same state.
    (It is only as good as the fit: a flow spreads some density between the data's modes.)

    Built once per run from the frozen flow, the dataset's (normalised) states and actions, and the seed:
    a fixed sample of `n_states` dataset states (all if fewer), drawn with its own torch.Generator so the
    training's random stream is untouched; the data's own log-likelihoods there; their 1st percentile
    `threshold` (1% of the data lies below it, by construction); the histogram of the data's latents.
    `measure(policy)` then gives, for the policy's actions at those states:
    - diag/policy_nll: mean -log pi_beta(a | s); diag/data_nll: the data's, its reference;
    - diag/ood_rate: the fraction of actions below `threshold`: about 0.01 for a policy that acts like
      the data, towards 1 for one that leaves its support;
    - for latent policies, diag/latent_abs_max (max |z|) and `latent_counts` [act_dim, bins] over
      LATENT_EDGES: where in the latent box -- or beyond it, for the unbounded Normal policy -- it acts.
    Everything runs in chunks on the data's device; nothing is read to the host until the caller does."""

    def __init__(self, flow: ConditionalFlow, states: torch.Tensor, actions: torch.Tensor, seed: int,
                 n_states: int = 10_000, chunk: int = 4096):
        self.flow, self.chunk = flow, chunk
        generator = torch.Generator().manual_seed(seed)
        self.indices = torch.randperm(len(states), generator=generator)[:n_states].to(states.device)
        self.states, self.actions = states[self.indices], actions[self.indices]  # [n, state_dim], [n, act_dim]
        self.edges = torch.tensor(LATENT_EDGES, device=states.device)
        with torch.no_grad():
            log_prob, latents = [], []
            for i in range(0, len(self.states), chunk):
                latents.append(flow.encode(self.actions[i:i + chunk], self.states[i:i + chunk])[0])
                log_prob.append(flow.log_prob(self.actions[i:i + chunk], self.states[i:i + chunk]))
            self.data_log_prob = torch.cat(log_prob)  # [n]
        self.data_nll = -self.data_log_prob.mean()
        self.threshold = torch.quantile(self.data_log_prob.double(), 0.01).to(self.data_log_prob.dtype)
        self.data_counts = self.histogram(torch.cat(latents))

    def histogram(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, act_dim] -> counts [act_dim, len(LATENT_EDGES) + 1] (int64)."""
        inside = latents.abs() <= 1.0
        latents = torch.where(inside, latents.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS), latents)
        bins = torch.bucketize(latents, self.edges.to(latents.dtype), right=True)  # [B, act_dim]
        return F.one_hot(bins, len(LATENT_EDGES) + 1).sum(0)

    @torch.no_grad()
    def measure(self, policy: Callable, policy_states: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """policy: states [B, state_dim] -> (actions [B, act_dim], latents [B, act_dim] or None). It is given
        `policy_states` (default: the sample's states as the flow sees them), row-aligned with the sample: a
        policy that normalises states its own way (behavior_likelihood.py) gets its own. -> 0-dim tensors,
        plus latent_counts when the policy has latents."""
        policy_states = self.states if policy_states is None else policy_states
        nll = below = torch.zeros((), device=self.states.device)
        abs_max, counts = None, None
        for i in range(0, len(self.states), self.chunk):
            actions, latents = policy(policy_states[i:i + self.chunk])
            log_prob = self.flow.log_prob(actions, self.states[i:i + self.chunk])
            nll = nll - log_prob.sum()
            below = below + (log_prob < self.threshold).sum()
            if latents is not None:
                chunk_max, chunk_counts = latents.abs().max(), self.histogram(latents)
                abs_max = chunk_max if abs_max is None else torch.maximum(abs_max, chunk_max)
                counts = chunk_counts if counts is None else counts + chunk_counts
        n = len(self.states)
        out = {"diag/policy_nll": nll / n, "diag/data_nll": self.data_nll, "diag/ood_rate": below / n}
        if abs_max is not None:
            out.update({"diag/latent_abs_max": abs_max, "latent_counts": counts})
        return out

    def hook(self, policy: Callable, run: "Run") -> Callable[[int], Dict[str, float]]:
        """train_agent's `diagnose` for a latent policy (`latent_policy(agent)`): at each evaluation
        `measure(policy)`, one host read, one line appended to RUN_DIR/latent_histograms.jsonl (step,
        edges, and per latent dimension the policy's counts and the data's data_counts) and one printed
        line; returns the scalars to log. On --resume the file keeps the lines the checkpoint covers, as
        metrics.jsonl does."""
        path = run.dir / "latent_histograms.jsonl"
        checkpoint = run.checkpoint
        last = checkpoint["step"] if checkpoint is not None and checkpoint["phase"] == "rl" else 0
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= last:
                        keep.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):  # a line cut by a crash mid-write
                    continue
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
        data_counts = self.data_counts.tolist()

        def diagnose(step: int) -> Dict[str, float]:
            out = self.measure(policy)
            counts = out.pop("latent_counts")
            keys = list(out)
            flat = torch.cat([torch.stack([out[k].float() for k in keys]), counts.flatten().float()]).cpu()  # one read
            scalars = dict(zip(keys, flat[:len(keys)].tolist()))
            counts = flat[len(keys):].view(counts.shape).long().tolist()
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, "n_states": len(self.states), "edges": list(LATENT_EDGES),
                                    "counts": counts, "data_counts": data_counts}) + "\n")
            run.note(f"step {step}  policy NLL {scalars['diag/policy_nll']:.2f} (data {scalars['diag/data_nll']:.2f})"
                     f"  OOD rate {100 * scalars['diag/ood_rate']:.1f}%  max |z| {scalars['diag/latent_abs_max']:.2f}")
            return scalars

        return diagnose


class FlowProgress:
    """Phase 1's bookkeeping for `pretrain_flow`: resume from a phase-1 checkpoint, early stop after
    `flow_patience` evaluations without a better validation NLL, the logged NLLs (summed on the device: no
    sync per step), a checkpoint at every validation, and the best-validation flow written to RUN_DIR/flow.pt."""

    def __init__(self, run: "Run", trainer: FlowPretrainer):
        self.run, self.trainer, self.config = run, trainer, run.config
        self.step, self.best_nll, self.best_state, self.since_best = 0, float("inf"), None, 0
        self.train_nll, self.since_log = torch.zeros((), device=self.config.device), 0

    @classmethod
    def start(cls, run: "Run", trainer: FlowPretrainer) -> "FlowProgress":
        progress, checkpoint = cls(run, trainer), run.checkpoint
        run.phase = "flow"
        if checkpoint is not None:
            trainer.load_state_dict(checkpoint["pretrainer"])
            progress.step, progress.best_nll = checkpoint["step"], checkpoint["best_valid_nll"]
            progress.best_state, progress.since_best = checkpoint["best_flow"], checkpoint["evaluations_since_best"]
            set_rng_state(checkpoint["rng"])  # the resumed run draws the batches the uninterrupted one would
        run.checkpoint_state = progress.state  # a polite stop checkpoints any step
        return progress

    def state(self) -> dict:
        return {"pretrainer": self.trainer.state_dict(), "best_valid_nll": self.best_nll,
                "best_flow": self.best_state, "evaluations_since_best": self.since_best}

    def steps(self, total: int):
        for step in self.run.steps(self.step, total, "phase 1: flow"):
            if self.config.flow_patience and self.since_best >= self.config.flow_patience:
                self.run.note(f"phase 1: validation NLL has not improved for {self.since_best} evaluations; "
                              f"stopping at step {step - 1} (flow_patience)")
                break
            yield step

    def add(self, train_nll: torch.Tensor) -> None:
        self.train_nll += train_nll
        self.since_log += 1

    def validated(self, valid_nll: float) -> None:
        run = self.run
        run.logger.log({"flow/train_nll": self.train_nll.item() / self.since_log, "flow/valid_nll": valid_nll},
                       run.step, "flow")
        self.train_nll, self.since_log = self.train_nll.zero_(), 0
        self.since_best += 1
        if valid_nll < self.best_nll:
            self.best_nll, self.since_best = valid_nll, 0
            self.best_state = copy.deepcopy(self.trainer.flow.state_dict())
        run.save_checkpoint(self.state())

    def best_flow(self, validation_nll: Callable[[], float], buffer: "ReplayBuffer") -> ConditionalFlow:
        flow = self.trainer.flow
        if self.best_state is None:  # flow_steps == 0: keep the initialised flow
            self.best_state, self.best_nll = flow.state_dict(), validation_nll()
        flow.load_state_dict(self.best_state)
        save_atomic({"flow": self.best_state, "sizes": flow.describe(), "best_valid_nll": self.best_nll,
                     "base_distribution": BASE_DISTRIBUTION, "state_mean": torch.from_numpy(buffer.state_mean),
                     "state_std": torch.from_numpy(buffer.state_std)}, self.run.dir / "flow.pt")
        return flow


def load_flow(path: str, buffer: "ReplayBuffer", device: str, amp: bool) -> ConditionalFlow:
    """A flow.pt written by phase 1 (flow weights, sizes, and the state normalisation it saw)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --flow_checkpoint {path} does not exist")
    saved = torch_load(path)
    if saved.get("base_distribution") != BASE_DISTRIBUTION:
        raise SystemExit(f"error: --flow_checkpoint {path} has a {saved.get('base_distribution')} latent; "
                         f"this script needs a {BASE_DISTRIBUTION}-latent flow.pt")
    flow = ConditionalFlow(**saved["sizes"], amp=amp)
    if (flow.action_dim, flow.state_dim) != (buffer.actions.shape[1], buffer.states.shape[1]):
        raise SystemExit(f"error: --flow_checkpoint {path} was trained for {flow.action_dim}-dim actions and "
                         f"{flow.state_dim}-dim states; this data has {buffer.actions.shape[1]} and "
                         f"{buffer.states.shape[1]}")
    flow.load_state_dict(saved["flow"])
    if not np.allclose(saved["state_mean"].numpy(), buffer.state_mean, atol=1e-4):
        warnings.warn(f"{path} was trained with another state normalisation (another dataset?)")
    return flow.to(device)


def flow_for_phase_2(config: TrainConfig, buffer: "ReplayBuffer",
                     run: "Run") -> Tuple[ConditionalFlow, Optional[dict]]:
    """Phase 1, or its result (--flow_checkpoint, or the flow.pt of a run resumed in phase 2).
    Returns the flow and the checkpoint phase 2 resumes from (None: phase 2 starts fresh)."""
    if config.flow_checkpoint is not None:
        return load_flow(config.flow_checkpoint, buffer, config.device, config.amp), run.checkpoint
    if run.checkpoint is not None and run.checkpoint["phase"] == "rl":
        return load_flow(str(run.dir / "flow.pt"), buffer, config.device, config.amp), run.checkpoint
    return pretrain_flow(config, buffer, run), None


def best_flow_nll(run_dir: Path) -> Optional[float]:
    """Phase 1's best validation NLL, from RUN_DIR/flow.pt (None when the flow came from --flow_checkpoint)."""
    flow_file = run_dir / "flow.pt"
    return float(torch_load(flow_file)["best_valid_nll"]) if flow_file.exists() else None


# %% Several seeds in one process (`--seeds 0 1 2`): N agents over one flow, one vmapped update
class AgentNetworks(nn.Module):
    """A CNF agent's three networks as one module whose forward is one of the agent's methods (`critic_loss`,
    `actor_loss`, `act`) or its `latent_policy`: what torch.func.functional_call runs with one seed's parameters
    in place of the agent's own."""

    def __init__(self, agent: CNF):
        super().__init__()
        self.actor, self.critic, self.target_critic = agent.actor, agent.critic, agent.target_critic
        self.agent = (agent,)  # not a submodule: its networks are the three above

    def forward(self, method: str, *args):
        agent = self.agent[0]
        return latent_policy(agent)(*args) if method == "latent_policy" else getattr(agent, method)(*args)


class SeedCNF:
    """N seeds' CNF agents trained in lock-step over one frozen flow (`--seeds`), each update one batched pass.

    The seeds' networks are stacked (torch.func.stack_module_state: every parameter gets a leading axis of N), and
    CNF's one-agent losses, `CNF.critic_loss` (Eq. 6) and `CNF.actor_loss` (Eqs. 7-8), run under torch.func.vmap
    over that axis: each seed with its own minibatch [N, B, ...] (SeedBatches) and its own noise
    (randomness="different"), the frozen flow shared. torch.func.grad gives each seed the gradient of its own loss,
    so no gradient crosses seeds, and one Adam over the stacks is N Adams (Adam is elementwise): seed i's agent is
    the paper's algorithm step by step (tests/test_seeds.py). Its initial weights, batches and noise are draws from
    the one random stream the first seed seeds, so it is not bitwise a `--seed i` run; phase 1 runs once, with the
    first seed (the paper trains one flow per dataset)."""

    def __init__(self, flow: ConditionalFlow, state_dim: int, action_dim: int, config: TrainConfig, seeds: int):
        agents = [CNF(flow, state_dim, action_dim, config) for _ in range(seeds)]
        self.agent, self.config, self.seeds = agents[0], config, seeds  # agent 0 lends its modules to functional_call
        self.flow, self.networks = self.agent.flow, AgentNetworks(self.agent)
        self.params = {}  # network -> {parameter name: [N, ...] stacked parameter}
        for network in ("actor", "critic", "target_critic"):
            stacked, _ = torch.func.stack_module_state([getattr(agent, network) for agent in agents])
            trained = network != "target_critic"
            self.params[network] = {k: v.detach().requires_grad_(trained) for k, v in stacked.items()}
        fused = torch.device(config.device).type in ("cpu", "cuda")
        self.actor_optimizer = torch.optim.Adam(self.params["actor"].values(), lr=config.actor_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.params["critic"].values(), lr=config.critic_lr, fused=fused)

    def call(self, method: str, *batched, params: Optional[Dict[str, dict]] = None):
        """`method` of every seed's agent under vmap (inputs and outputs with a leading seed axis)."""
        def one_seed(params: Dict[str, dict], *args):
            flat = {f"{network}.{name}": value for network, named in params.items() for name, value in named.items()}
            return torch.func.functional_call(self.networks, flat, (method, *args))

        return torch.func.vmap(one_seed, randomness="different")(params or self.params, *batched)

    def step(self, loss: str, trained: str, optimizer: torch.optim.Optimizer, batch) -> Tuple[torch.Tensor, ...]:
        """One optimiser step of every seed's `trained` network on its own `loss`; -> (loss [N], aux [N, ...])."""
        others = {network: named for network, named in self.params.items() if network != trained}

        def loss_of(trained_params: dict, other_params: dict, batch):
            value, aux = torch.func.functional_call(
                self.networks, {**{f"{trained}.{k}": v for k, v in trained_params.items()},
                                **{f"{n}.{k}": v for n, named in other_params.items() for k, v in named.items()}},
                (loss, batch))
            return value, (value.detach(), aux.detach())

        grads, (value, aux) = torch.func.vmap(torch.func.grad(loss_of, has_aux=True), randomness="different")(
            self.params[trained], others, batch)
        for param, grad in zip(self.params[trained].values(), grads.values()):
            param.grad = grad
        optimizer.step()
        return value, aux

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[Tuple[int, str], torch.Tensor]:
        """CNF.train for every seed on a batch [N, B, ...]; the logged scalars keyed (seed index, name)."""
        critic_loss, q = self.step("critic_loss", "critic", self.critic_optimizer, batch)
        actor_loss, weights = self.step("actor_loss", "actor", self.actor_optimizer, batch)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.params["target_critic"].values()), list(self.params["critic"].values()),
                                 self.config.tau)
        metrics = {"critic_loss": critic_loss, "actor_loss": actor_loss, "q_mean": q.flatten(1).mean(1),
                   "adv_weight_mean": weights.flatten(1).mean(1)}
        return {(i, key): values[i] for key, values in metrics.items() for i in range(self.seeds)}

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Evaluation: states [N x E, state_dim], seed i's E rows after seed i - 1's -> actions [N x E, act_dim]."""
        return self.call("act", states.view(self.seeds, -1, states.shape[-1])).flatten(0, 1)

    def seed_policy(self, i: int) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
        """Seed i's `latent_policy` (for BehaviourLikelihood): states [n, state_dim] -> (actions, latents)."""
        def policy(states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            params = {network: {k: v[i] for k, v in named.items()} for network, named in self.params.items()}
            flat = {f"{network}.{k}": v for network, named in params.items() for k, v in named.items()}
            return torch.func.functional_call(self.networks, flat, ("latent_policy", states))

        return policy

    def state_dict(self) -> dict:
        networks = {network: {k: v.detach().clone() for k, v in named.items()}
                    for network, named in self.params.items()}
        return {**networks,
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for network, named in self.params.items():
                for k, v in named.items():
                    v.copy_(state[network][k])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    def seed_state_dict(self, state: dict, i: int) -> dict:
        """Seed i's agent in `state` (a SeedCNF.state_dict()), as CNF.state_dict() writes one agent."""
        return seed_agent_state(state, i)


def seed_agent_state(state: dict, i: int) -> dict:
    """Seed i's slice of a SeedCNF state: every stacked tensor [N, ...] (parameters and Adam's moments) at i."""
    out = {network: {k: v[i].clone() for k, v in state[network].items()}
           for network in ("actor", "critic", "target_critic")}
    for optimizer in ("actor_optimizer", "critic_optimizer"):
        saved = state[optimizer]
        out[optimizer] = {"param_groups": saved["param_groups"], "state": {
            index: {key: value if key == "step" else value[i].clone() for key, value in moments.items()}
            for index, moments in saved["state"].items()}}
    return out


class SeedBatches:
    """The replay buffer as SeedCNF's loop sees it: `sample(B)` draws N independent minibatches, [N, B, ...]."""

    def __init__(self, buffer: "ReplayBuffer", seeds: int):
        self.buffer, self.seeds = buffer, seeds

    def __getattr__(self, name: str):  # state_mean, state_std, ...: the buffer's
        return getattr(self.buffer, name)

    def sample(self, batch_size: int) -> Tuple[torch.Tensor, ...]:
        return tuple(x.view(self.seeds, batch_size, -1) for x in self.buffer.sample(self.seeds * batch_size))


def checked_seeds(config: TrainConfig) -> List[int]:
    """--seeds (or [--seed]), refused before any work when it cannot be run: repeated or negative seeds, a --seed
    that is none of them, or, with --resume, other seeds than the run's (or a seed's directory gone)."""
    if config.seeds is None:
        return [config.seed]
    seeds, shown = list(config.seeds), " ".join(map(str, config.seeds))
    if not seeds or len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise SystemExit(f"error: --seeds {shown!r} is not allowed: one or more distinct seeds, each 0 or more")
    if config.resume is not None:
        saved = load_yaml_config(TrainConfig, str(Path(config.resume) / "config.yaml"), "--resume").seeds
        if saved != seeds:
            raise SystemExit(f"error: --seeds {shown} but the run in {config.resume} was started with "
                             f"{'--seeds ' + ' '.join(map(str, saved)) if saved else 'one seed'}; leave --seeds out")
    if config.seed not in seeds and config.seed != TrainConfig.seed:
        raise SystemExit(f"error: --seed {config.seed} and --seeds {shown}: pass one of them (with --seeds each "
                         f"seed's run directory gets its own seed)")
    if config.resume is not None and len(seeds) > 1:
        for run_dir in seed_dirs(Path(config.resume), seeds):
            if not (run_dir / "config.yaml").is_file():
                raise SystemExit(f"error: --resume {config.resume}: its seeds' run directory {run_dir} is gone")
    return seeds


def seed_dirs(run_dir: Path, seeds: List[int]) -> List[Path]:
    """All the run directories of a --seeds run from any one of them: their names differ in `-seed<s>` only."""
    seed = load_yaml_config(TrainConfig, str(run_dir / "config.yaml"), "--resume").seed
    cut = run_dir.name.rfind(f"-seed{seed}")
    head, tail = run_dir.name[:cut], run_dir.name[cut + len(f"-seed{seed}"):]
    return [run_dir.with_name(f"{head}-seed{s}{tail}") for s in seeds]


class SeedRuns:
    """The run directories of N seeds, driven as one run by the shared loop (`train_agent`), which calls what it
    would call on a Run. Each directory gets what a single run writes, with its own seed's scores and losses;
    its checkpoint.pt holds its agent (CNF's format) and, under "seed_group", the group's state: any one of them
    resumes all N (the newest wins: a crash between the N atomic writes loses nothing)."""

    def __init__(self, runs: List["Run"], seeds: List[int]):
        self.update_time, self.checkpoint_state, self.pending, self.pool = 0.0, None, None, None  # evaluated here
        self.runs, self.seeds, self.agent = runs, seeds, None
        self.phase, self.step = runs[0].phase, runs[0].step
        self.config, self.data, self.dir, self.logger = runs[0].config, runs[0].data, runs[0].dir, self
        saved = runs[0].checkpoint
        group = saved.get("seed_group") if saved is not None else None
        self.evaluations = [[tuple(e) for e in seed] for seed in group["evaluations"]] if group else [[] for _ in seeds]
        # What train_agent resumes from: the group's agent and the loop's own evaluations (the seeds' mean).
        self.checkpoint = ({**saved, "agent": group["agent"], "evaluations": group["mean_evaluations"]} if group
                           else saved)

    @classmethod
    def start(cls, config: TrainConfig, data: "OfflineData", seeds: List[int]) -> "SeedRuns":
        """Make every seed's run directory, `<run_name>-seed<s>` or `cnf-<data>-seed<s>-<time>` (config.yaml with
        its seed), or with --resume reopen them all."""
        if config.resume is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            flat = re.sub(r"[^A-Za-z0-9._-]+", "_", data.name)  # a Minari id's slashes
            names = [f"{config.run_name}-seed{s}" if config.run_name else f"{ALGORITHM}-{flat}-seed{s}-{stamp}"
                     for s in seeds]
            configs = [replace(config, seed=s, run_name=name) for s, name in zip(seeds, names)]
        else:
            dirs = seed_dirs(Path(config.resume), seeds)
            newest_checkpoint_everywhere(dirs)
            configs = [replace(config, seed=s, run_name=d.name, resume=str(d)) for s, d in zip(seeds, dirs)]
        if config.wandb_mode != "disabled":
            os.environ["WANDB_REINIT"] = "create_new"  # one wandb run per seed in this process
        group = cls([start_run(c, data) for c in configs], seeds)
        set_seed(seeds[0])  # start_run seeded each seed in turn; the first seed's stream drives all N
        Run.active = group
        return group

    def __getattr__(self, name: str):
        """The loop's bookkeeping (resume_agent, steps, timed, checkpoint_agent, ...) as a Run does it, on the
        group: its step, phase, save_checkpoint and (in-process) evaluate are the group's own."""
        if name in ("resume_agent", "steps", "timed", "checkpoint_agent", "agent_results", "collect", "close"):
            return getattr(Run, name).__get__(self)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("phase", "step"):  # the group's phase and step are every seed's run's
            for run in self.runs:
                setattr(run, name, value)
        object.__setattr__(self, name, value)

    def set_status(self, state: str) -> None:
        for run in self.runs:
            run.set_status(state)

    def log(self, metrics: Dict[Tuple[int, str], float], step: int, phase: str = "rl") -> None:
        """As the loop's logger: SeedCNF's scalars, keyed (seed index, name), each into its seed's metrics.jsonl."""
        for i, run in enumerate(self.runs):
            mine = {name: value for (seed, name), value in metrics.items() if seed == i}
            if mine:
                run.logger.log(mine, step, phase)

    def evaluate(self, act: Callable[[torch.Tensor], torch.Tensor], buffer: "ReplayBuffer", evaluations: list) -> None:
        """Every seed's episodes stepped together in one vector env, seed s's reset with seeds s, s + 1, ... as a
        --seed s run's (here, not in workers); each seed's score logged and printed in its own run; the loop's
        `evaluations` get the seeds' mean."""
        episodes, data = self.config.eval_episodes, self.data
        env_seeds = [seed + j for seed in self.seeds for j in range(episodes)]
        returns = evaluate(data.make_eval_env, act, buffer.state_mean, buffer.state_std, len(env_seeds), env_seeds,
                           self.config.device).reshape(len(self.seeds), episodes)
        reference = f"  (dataset average {data.dataset_score:.1f})" if data.dataset_score is not None else ""
        for run, seed_returns, seed_evaluations in zip(self.runs, returns, self.evaluations):
            score = float(np.mean(data.normalize_score(seed_returns)))
            run.logger.log({"eval/normalized_score": score, "eval/return": float(seed_returns.mean())}, step=run.step)
            run.note(f"step {run.step}  seed {run.config.seed}  normalized {score:.1f}{reference}")
            seed_evaluations.append((run.step, score))
        evaluations.append((self.step, float(np.mean([seed[-1][1] for seed in self.evaluations]))))

    def save_checkpoint(self, state: dict) -> None:
        """Every seed's checkpoint.pt: its own agent and scores as a single run's, and the group's state."""
        group = {"seeds": self.seeds, "agent": state["agent"], "evaluations": self.evaluations,
                 "mean_evaluations": state["evaluations"]}
        for i, run in enumerate(self.runs):
            run.save_checkpoint({**state, "agent": self.agent.seed_state_dict(state["agent"], i),
                                 "evaluations": self.evaluations[i], "seed_group": group})

    def share_flow(self) -> None:
        """Phase 1's flow.pt (the first seed's run wrote it) copied into every seed's run directory."""
        if (self.dir / "flow.pt").exists():
            for run in self.runs[1:]:
                shutil.copyfile(self.dir / "flow.pt", run.dir / ".flow.pt.tmp")
                os.replace(run.dir / ".flow.pt.tmp", run.dir / "flow.pt")

    def diagnose(self, hooks: List[Callable[[int], Dict[str, float]]]) -> Callable[[int], dict]:
        """train_agent's `diagnose`: each seed's BehaviourLikelihood hook, logged in its own run."""
        def diagnose(step: int) -> dict:
            for run, hook in zip(self.runs, hooks):
                run.logger.log(hook(step), step)
            return {}

        return diagnose

    def finish(self, results: dict) -> Path:
        """Each seed's results.json (its own scores; the updates/s are the group's, each seed's rate)."""
        paths = []
        for run, evaluations in zip(self.runs, self.evaluations):
            paths.append(finish_run(run, {**summarize(evaluations), "updates_per_s": results["updates_per_s"],
                                          "flow_best_valid_nll": best_flow_nll(run.dir)}))
            print(f"  seed {run.config.seed}: {paths[-1]}")
        return paths[0]


def newest_checkpoint_everywhere(dirs: List[Path]) -> None:
    """Before resuming: a seed whose checkpoint.pt is older than the newest phase-2 one (a stop between the N
    writes) gets its part of the newest, so every seed resumes, and drops its metrics, from the same step."""
    saved = {d: torch_load(d / "checkpoint.pt") for d in dirs if (d / "checkpoint.pt").exists()}
    newest = max(saved.values(), key=lambda c: (c["phase"] == "rl", c["step"]), default=None)
    if newest is None or "seed_group" not in newest:
        return
    for i, run_dir in enumerate(dirs):
        if run_dir not in saved or (saved[run_dir]["phase"], saved[run_dir]["step"]) != ("rl", newest["step"]):
            group = newest["seed_group"]
            save_atomic({**newest, "agent": seed_agent_state(group["agent"], i),
                         "evaluations": group["evaluations"][i]}, run_dir / "checkpoint.pt")


def train_seeds(config: TrainConfig, seeds: List[int]) -> Path:
    """`train` for N seeds (SeedCNF): one data load, one phase 1 (the first seed's), then the N agents in lock-step,
    each in its own run directory (SeedRuns); returns the first seed's results.json."""
    data = load_offline_data(config)
    group = SeedRuns.start(config, data, seeds)
    buffer = ReplayBuffer(data, config.device)
    flow, checkpoint = flow_for_phase_2(group.config, buffer, group.runs[0])
    group.share_flow()
    group.agent = agent = SeedCNF(flow, buffer.states.shape[1], buffer.actions.shape[1], group.config, len(seeds))
    hooks = [BehaviourLikelihood(agent.flow, buffer.states, buffer.actions, seed).hook(agent.seed_policy(i), run)
             for i, (seed, run) in enumerate(zip(seeds, group.runs))]
    resumed = group.checkpoint if checkpoint is not None else None
    results = train_agent(agent, SeedBatches(buffer, len(seeds)), group, resumed,
                          desc=f"phase 2: RL, {len(seeds)} seeds", diagnose=group.diagnose(hooks))
    return group.finish(results)


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
