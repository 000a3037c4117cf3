"""LAPO: an advantage-weighted conditional VAE of the behaviour policy and a bounded latent policy on it.

Companion to Chen, Ghadirzadeh, Yu, Wang, Gao, Li, Bin, Finn, Zhang, "LAPO: Latent-Variable Advantage-Weighted
Policy Optimization for Offline Reinforcement Learning" (NeurIPS 2022), as the LAPO baseline of Akimov et al.
(arXiv 2211.11096): the LAPO column of Table 1 (the CNF paper copies LAPO's published scores; this file runs
it). Faithful to the official code (pcchenxi/LAPO-offlienRL: main_d4rl.py, algos/algos_vae.py, algos/utils.py).

    python algorithms/lapo.py --env halfcheetah-medium-v2                          # D4RL (Docker image)
    python algorithms/lapo.py --config_path algorithms/configs/lapo/hopper-medium-v2.yaml   # per-dataset values
    python algorithms/lapo.py --config_path algorithms/configs/lapo/maze2d-umaze-v1.yaml    # kl_beta 0.3 (Docker)
    python algorithms/lapo.py --config_path algorithms/configs/lapo/quick.yaml     # CPU quick preset
    python algorithms/lapo.py --dataset_path FILE.hdf5 --eval_env Hopper-v4         # any D4RL-format file

LAPO, unlike PLAS, trains its CVAE *jointly* with the critics and the policy, and weights each sample's CVAE
loss by the sign of its advantage, so that the decoder models the better actions of the data; the latent policy
is clipped at z_max tanh, the post-hoc clipping that CNF's bounded flow latent replaces. One update
(`LAPO.train`), in the official order, on a batch (s, a, r, s', d) whose states and actions are z-scored:
1. critics (one module, one Adam): Q_i(s, a) regress y = r + gamma (1 - d) V(s') with the *online* V
   (before this step; there is no target V); V(s) regresses
       v = clamp(lambda min_i Q_i'(s, a~) + (1 - lambda) max_i Q_i'(s, a~), V_min, V_max),
       a~ = dec'(s, pi'(s) + clip(0.1 eps, -0.2, 0.2)), eps ~ N(0, I),
   with the target critics Q_i', target policy pi' and EMA decoder dec'; loss MSE(Q_1) + MSE(Q_2) + MSE(V);
2. advantage-weighted CVAE: A = r + gamma (1 - d) Qmix'(s', dec'(s', pi'(s'))) - V(s), V after step 1,
   Qmix' the same lambda-mix; w = expectile (0.9) where A > 0, else 1 - expectile; loss
   mean_batch(w [sum_j (dec(s, z)_j - a_j)^2 + kl_beta KL(q(z | s, a) || N(0, I))]), z ~ q(z | s, a);
3. latent policy z = pi(s) = z_max tanh(MLP(s)), z_max = 2: loss -Q_1(s, dec'(s, pi(s))) with the
   critic of step 1, through the EMA decoder;
4. Polyak averaging, tau = 0.005, of the target critics, the target policy and the EMA decoder.
Acting: a = dec'(s, pi(s)) un-normalised (a std_a + mean_a) and clipped to the action box.
Networks: every MLP (encoder, decoder, policy, Q_1, Q_2, V) has 3 hidden layers of 256 (ReLU); the
latent has 2 x action dim; the decoder's output is linear (an action in the z-scored action space).
Adam, lr 2e-4 for CVAE, policy and critics; batch 512; 1M updates; gamma 0.99.

Data, per family, as the official main_d4rl.py and ReplayBuffer:
- states and actions z-scored over the dataset, (x - mean) / (std + 1e-6);
- rewards (`--reward_scaling auto`): locomotion and maze2d (every dataset but antmaze): r / max(r),
  V clamped to [min(r), max(r)] / (1 - gamma) of the scaled rewards, i.e. V_max = 1 / (1 - gamma);
  antmaze: 100 r, V clamped to [0, 100];
- maze2d: kl_beta 0.3 (official README); antmaze: lambda (`--target_lambda`, official `--doubleq_min`) 0.7;
  everything else the official defaults (lambda 1: the V target is the minimum of the two target critics).

Deviations from the official code, and choices where it is silent (an update's numbers are the same unless said):
- Acting clips the un-normalised action to the action box [-1, 1]; the official code passes it unclipped.
  MuJoCo clamps the control to the same box, but the locomotion envs' control cost sees the unclipped
  action, so an out-of-box action scores a little lower there (maze2d's reward ignores the action).
- The EMA target keeps the decoder only, and there is no target V: the official code Polyak-averages the
  whole CVAE and the whole critic module (V included) but never reads the target encoder or target V.
- Q_1 and Q_2 are one vectorised ensemble (cnf.py's TwinCritic); with V they form one module under one Adam,
  as the official `Critic` (Adam is element-wise: the same updates). The encoder's mean and log-variance
  heads are one linear layer with 2k outputs (the same function as two heads on the shared trunk).
- The policy loss differentiates with respect to the action only (Q_1's parameters detached in `q1`); the
  official code also fills the critic's .grad there, which its next critic step zeroes: same updates.
- The target critics' passes of steps 1 (at s, noisy latent) and 2 (at s', noiseless) run as one batched
  pass: the target networks do not change in between.
- The official code asserts |mean(y)| < 1e6 every 5000 updates; not here (no host syncs but every `log_every`).
- The official `--no_noise` flag is parsed but never read (the V target always has the noise): not offered. The
  official LAPO class defaults (lambda 0.8, expectile 0.8, lr 1e-4 / 5e-4) yield to main_d4rl.py's, ours.
- Evaluation: 10 episodes every 5000 updates (as the official code), stepped together in a vector env
  seeded with `--seed`; the score is the mean of the last 10 evaluations (the CNF paper's protocol).
- Batches and the target noise are drawn with torch on the training device (official: numpy batches on
  the host). Same law. Seeds 0, 1, 2 (the official README: 123, 456, 789).
- `--amp` (off by default): bfloat16 matmuls in the hidden layers; output layers, losses, advantages, targets float32.

Reading order: config, networks, the update (`LAPO.train`), the data as LAPO sees it, the loop (cnf.py's); then,
below two banners, LAPO's settings checks and the plumbing every file shares (data sources, evaluation). What is
cnf.py's is copied whole and marked `# Copied from cnf.py: NAME` (tests/test_copies.py keeps the copies identical).
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

ALGORITHM = "lapo"


@dataclass
class TrainConfig:
    # --- LAPO (official main_d4rl.py defaults) ---
    hidden_dim: int = 256  # width of every network: encoder, decoder, policy, Q_1, Q_2, V
    n_layers: int = 4  # linear layers in each (official: 3 hidden layers of 256)
    vae_lr: float = 2e-4  # CVAE learning rate
    actor_lr: float = 2e-4  # latent policy learning rate
    critic_lr: float = 2e-4  # learning rate of the critic module (Q_1, Q_2 and V, one Adam)
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # Polyak rate of the target critics, the target policy and the EMA decoder
    expectile: float = 0.9  # CVAE sample weight where the advantage is positive; 1 - expectile elsewhere
    kl_beta: float = 1.0  # weight of the KL term of the CVAE loss (official README: maze2d 0.3)
    z_max: float = 2.0  # latent policy range [-z_max, z_max]^k (official --max_latent_action)
    target_lambda: float = 1.0  # V target: lambda min + (1 - lambda) max of Q_1', Q_2' (--doubleq_min; antmaze 0.7)
    policy_noise: float = 0.1  # std of the Gaussian noise on the target policy's latent in the V target
    noise_clip: float = 0.2  # that noise is clipped to [-noise_clip, noise_clip]
    reward_scaling: str = "auto"  # auto | max (r / max r) | antmaze (100 r; V in [0, 100]) | none (see scale_rewards)
    # --- schedule ---
    train_steps: int = 1_000_000  # gradient updates (official: 1M)
    batch_size: int = 512  # batch size (official: 512)
    eval_every: int = 5_000  # updates between evaluations (official: 5000)
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


# %% Networks: cnf.py's MLPs and twin critics, then LAPO's CVAE, latent policy and critics
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


class MLP(nn.Module):
    """mlp(in_dim -> out_dim) on the concatenated inputs; with amp the hidden layers' matmuls run in bfloat16,
    the output layer in float32."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, n_layers: int, amp: bool = False):
        super().__init__()
        self.net, self.amp = mlp(in_dim, out_dim, hidden, n_layers), amp

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = torch.cat(inputs, dim=-1) if len(inputs) > 1 else inputs[0]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            x = self.net[:-1](x)
        return self.net[-1](x.float())


class ConditionalVAE(nn.Module):
    """LAPO's model of the behaviour policy, in the z-scored action space. Encoder q(z | s, a) = N(mean,
    exp(log_var)): (s, a) -> 3 x 256 -> (mean, log_var), log_var unclamped (official); decoder a = dec(s, z):
    (s, z) -> 3 x 256 -> a, linear output. Latent dim k = 2 x action dim."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, n_layers: int, amp: bool = False):
        super().__init__()
        self.latent_dim = 2 * action_dim
        self.encoder = MLP(state_dim + action_dim, 2 * self.latent_dim, hidden, n_layers, amp)
        self.decoder = MLP(state_dim + self.latent_dim, action_dim, hidden, n_layers, amp)  # called (states, latents)

    def loss_terms(self, actions: torch.Tensor, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per sample [B, 1]: the squared reconstruction error of a reparameterised z ~ q(z | s, a), summed over
        action dimensions, and KL(q(z | s, a) || N(0, I)) = -1/2 sum_j (1 + log_var - mean^2 - exp(log_var))."""
        mean, log_var = self.encoder(states, actions).chunk(2, dim=-1)
        latents = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        reconstruction = ((self.decoder(states, latents) - actions) ** 2).sum(-1, keepdim=True)
        kl = -0.5 * (1.0 + log_var - mean ** 2 - log_var.exp()).sum(-1, keepdim=True)
        return reconstruction, kl


class LatentPolicy(nn.Module):
    """Deterministic z = pi(s) = z_max tanh(MLP(s)), s -> 3 x 256 -> k (official `Actor`)."""

    def __init__(self, state_dim: int, latent_dim: int, hidden: int, n_layers: int, z_max: float, amp: bool = False):
        super().__init__()
        self.net, self.z_max = MLP(state_dim, latent_dim, hidden, n_layers, amp), z_max

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.z_max * torch.tanh(self.net(states))


class Critics(nn.Module):
    """The official `Critic`: Q_1 and Q_2 (s, a) -> 3 x 256 -> 1, here one vectorised ensemble [2, B, 1], and
    V: s -> 3 x 256 -> 1 [B, 1]; one module, one Adam."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, n_layers: int, amp: bool = False):
        super().__init__()
        self.q = TwinCritic(state_dim, action_dim, hidden, n_layers, amp)
        self.v = MLP(state_dim, 1, hidden, n_layers, amp)


def q1(critic: TwinCritic, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q_1(s, a) alone [B, 1], its parameters detached: a loss on it differentiates the actions only."""
    x = torch.cat([states, actions], dim=-1)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=critic.amp):
        for layer in critic.net:
            if isinstance(layer, VectorizedLinear):
                x = torch.addmm(layer.bias[0].detach(), x, layer.weight[0].detach())
            else:
                x = layer(x)
    return x.float()


def advantage_weights(advantages: torch.Tensor, expectile: float) -> torch.Tensor:
    """LAPO's binary expectile-style sample weights: expectile where A > 0, 1 - expectile elsewhere."""
    return torch.where(advantages > 0, expectile, 1.0 - expectile)


# %% The update (steps 1-4 of the docstring)
class LAPO:
    """Jointly trained CVAE, latent policy and critics; `train(batch)` is one update (steps 1-4 above)."""

    def __init__(self, state_dim: int, action_dim: int, config: TrainConfig, value_range: Tuple[float, float],
                 action_mean: np.ndarray, action_std: np.ndarray):
        self.config = config
        device, hidden, n_layers, amp = config.device, config.hidden_dim, config.n_layers, config.amp
        self.vae = ConditionalVAE(state_dim, action_dim, hidden, n_layers, amp).to(device)
        self.target_decoder = copy.deepcopy(self.vae.decoder).requires_grad_(False)  # dec': acting and targets
        self.actor = LatentPolicy(state_dim, self.vae.latent_dim, hidden, n_layers, config.z_max, amp).to(device)
        self.target_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = Critics(state_dim, action_dim, hidden, n_layers, amp).to(device)
        self.target_critic = copy.deepcopy(self.critic.q).requires_grad_(False)
        fused = torch.device(device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.vae_optimizer = torch.optim.Adam(self.vae.parameters(), lr=config.vae_lr, fused=fused)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=fused)
        self.targets = [*self.target_critic.parameters(), *self.target_actor.parameters(),
                        *self.target_decoder.parameters()]
        self.sources = [*self.critic.q.parameters(), *self.actor.parameters(), *self.vae.decoder.parameters()]
        self.value_min, self.value_max = value_range  # the V target's clamp
        self.action_mean = torch.as_tensor(action_mean, dtype=torch.float32, device=device)
        self.action_std = torch.as_tensor(action_std, dtype=torch.float32, device=device)

    def mixed_target_q(self, states: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """lambda min_i Q_i'(s, dec'(s, z)) + (1 - lambda) max_i Q_i'(s, dec'(s, z)): [B, 1] (official
        `get_target_q`)."""
        low, high = torch.aminmax(self.target_critic(states, self.target_decoder(states, latents)), dim=0)
        return self.config.target_lambda * low + (1.0 - self.config.target_lambda) * high

    @torch.no_grad()
    def target_values(self, states: torch.Tensor, rewards: torch.Tensor, next_states: torch.Tensor,
                      dones: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (Q target y = r + gamma (1 - d) V(s'), V target clamp(Qmix'(s, dec'(s, pi'(s) + noise)), V_min, V_max),
        bootstrapped value of the advantage r + gamma (1 - d) Qmix'(s', dec'(s', pi'(s')))), each [B, 1]."""
        cfg, n = self.config, len(states)
        q_target = rewards + cfg.gamma * (1.0 - dones) * self.critic.v(next_states)  # the online V, before its step
        both = torch.cat([states, next_states])
        latents = self.target_actor(both)  # [2B, k]
        noise = (cfg.policy_noise * torch.randn_like(latents[:n])).clamp(-cfg.noise_clip, cfg.noise_clip)
        latents[:n] += noise  # not clipped back into the latent box (official)
        mixed = self.mixed_target_q(both, latents)  # one batched pass for both
        v_target = mixed[:n].clamp(self.value_min, self.value_max)
        bootstrapped = rewards + cfg.gamma * (1.0 - dones) * mixed[n:]
        return q_target, v_target, bootstrapped

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        states, actions, rewards, next_states, dones = batch  # states and actions z-scored
        cfg = self.config
        q_target, v_target, bootstrapped = self.target_values(states, rewards, next_states, dones)
        # 1. Critics: MSE(Q_1, y) + MSE(Q_2, y) + MSE(V, v), one Adam over Q_1, Q_2 and V.
        q, v = self.critic.q(states, actions), self.critic.v(states)  # [2, B, 1], [B, 1]
        critic_loss = ((q - q_target) ** 2).mean(dim=(1, 2)).sum() + ((v - v_target) ** 2).mean()
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        # 2. Advantage-weighted CVAE: A = r + gamma (1 - d) Qmix'(s', dec'(s', pi'(s'))) - V(s), V after step 1.
        with torch.no_grad():
            advantages = bootstrapped - self.critic.v(states)
            weights = advantage_weights(advantages, cfg.expectile)  # [B, 1]
        reconstruction, kl = self.vae.loss_terms(actions, states)  # [B, 1] each
        vae_loss = (weights * (reconstruction + cfg.kl_beta * kl)).mean()
        self.vae_optimizer.zero_grad(set_to_none=True)
        vae_loss.backward()
        self.vae_optimizer.step()

        # 3. Latent policy: maximise Q_1(s, dec'(s, pi(s))) with the updated critic, through the EMA decoder.
        latents = self.actor(states)
        actor_loss = -q1(self.critic.q, states, self.target_decoder(states, latents)).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        with torch.no_grad():  # 4. Polyak averaging of critics, policy and decoder, one fused op
            torch._foreach_lerp_(self.targets, self.sources, cfg.tau)
        return {"critic_loss": critic_loss.detach(), "vae_loss": vae_loss.detach(), "actor_loss": actor_loss.detach(),
                "reconstruction": reconstruction.detach().mean(), "kl": kl.detach().mean(),
                "q_mean": q.detach().mean(), "v_mean": v.detach().mean(),
                "positive_advantage_fraction": (advantages > 0).float().mean(),
                "latent_abs_mean": latents.detach().abs().mean()}

    @torch.no_grad()
    def decode_action(self, states: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """a = dec'(s, z) un-normalised to the data's action scale and clipped to the action box [-1, 1]^n."""
        return (self.target_decoder(states, latents) * self.action_std + self.action_mean).clamp(-1.0, 1.0)

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Evaluation: the online policy's latent through the EMA decoder (official `select_action`)."""
        return self.decode_action(states, self.actor(states))

    PARTS = ("vae", "target_decoder", "actor", "target_actor", "critic", "target_critic", "vae_optimizer",
             "actor_optimizer", "critic_optimizer")  # what a checkpoint holds

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in self.PARTS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.PARTS:
            getattr(self, name).load_state_dict(state[name])


# %% The data as LAPO sees it: rewards scaled per family, states and actions z-scored
REWARD_SCALINGS = ("auto", "max", "antmaze", "none")
ANTMAZE = re.compile(r"antmaze", re.IGNORECASE)


def scale_rewards(data: "OfflineData", scaling: str, gamma: float) -> Tuple["OfflineData", dict]:
    """The official main_d4rl.py: antmaze rewards x 100 and V clamped to [0, 100]; every other dataset r / max(r)
    and V clamped to [min r, max r] / (1 - gamma) of the scaled rewards. `auto` picks by the dataset's name."""
    if scaling not in REWARD_SCALINGS:
        raise SystemExit(f"error: --reward_scaling must be one of {', '.join(REWARD_SCALINGS)}, not {scaling!r}")
    if scaling == "auto":
        scaling = "antmaze" if ANTMAZE.search(data.name) else "max"
    scale = 1.0
    if scaling == "max":
        if data.rewards.max() <= 0:
            raise SystemExit(f"error: --reward_scaling max divides by the largest reward, and {data.name}'s is "
                             f"{data.rewards.max():.4g}; pass --reward_scaling none")
        scale = 1.0 / float(data.rewards.max())
    elif scaling == "antmaze":
        scale = 100.0
    rewards = (scale * data.rewards).astype(np.float32)
    value_range = ((0.0, 100.0) if scaling == "antmaze" else
                   (float(rewards.min()) / (1.0 - gamma), float(rewards.max()) / (1.0 - gamma)))
    info = {"reward_scaling": scaling, "reward_scale": scale, "value_min": value_range[0], "value_max": value_range[1]}
    return replace(data, rewards=rewards), info


def zscore(buffer: "ReplayBuffer", data: "OfflineData") -> Tuple[np.ndarray, np.ndarray]:
    """The official ReplayBuffer: states and actions (x - mean) / (std + 1e-6) over the dataset (the copied
    data block normalises states with std + 1e-3 and keeps raw actions); evaluation normalises observations
    with the buffer's new state_mean, state_std. Returns the action mean and std + 1e-6 that acting undoes."""
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=buffer.device)  # noqa: E731
    observations = data.observations.astype(np.float64)
    buffer.state_mean, buffer.state_std = observations.mean(0), observations.std(0) + 1e-6
    buffer.states = as_tensor((observations - buffer.state_mean) / buffer.state_std)
    buffer.next_states = as_tensor((data.next_observations - buffer.state_mean) / buffer.state_std)
    actions = data.actions.astype(np.float64)
    action_mean, action_std = actions.mean(0), actions.std(0) + 1e-6
    buffer.actions = as_tensor((actions - action_mean) / action_std)
    return action_mean, action_std


# %% The loop: cnf.py's RL loop, and train(config) on LAPO's data
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
    """LAPO's data (rewards scaled, states and actions z-scored), the updates, evaluations, checkpoints;
    returns the results.json path."""
    check_lapo_config(config)
    data, rewards_info = scale_rewards(load_offline_data(config), config.reward_scaling, config.gamma)
    run = start_run(config, data)
    buffer = ReplayBuffer(data, config.device)
    action_mean, action_std = zscore(buffer, data)
    value_range = (rewards_info["value_min"], rewards_info["value_max"])
    agent = LAPO(buffer.states.shape[1], buffer.actions.shape[1], config, value_range, action_mean, action_std)
    results = train_agent(agent, buffer, run, run.checkpoint, desc="LAPO")
    return finish_run(run, {**results, **rewards_info})


# ==== LAPO extras: its own settings' checks ====


def check_lapo_config(config: TrainConfig) -> None:
    """LAPO's own settings, one error line each (the shared ones are checked by `check_config`)."""
    rules = {"expectile": (0.0 < config.expectile < 1.0, "a number strictly between 0 and 1"),
             "target_lambda": (0.0 <= config.target_lambda <= 1.0, "a number in [0, 1]"),
             "kl_beta": (config.kl_beta >= 0.0, "0 or more"), "z_max": (config.z_max > 0.0, "a positive number"),
             "policy_noise": (config.policy_noise >= 0.0, "0 or more"),
             "noise_clip": (config.noise_clip >= 0.0, "0 or more")}
    for name, (ok, allowed) in rules.items():
        if not ok:
            raise SystemExit(f"error: --{name} {getattr(config, name)!r} is not allowed: {allowed}")


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
