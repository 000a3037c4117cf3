"""PLAS: a deterministic policy in the latent space of a pre-trained conditional VAE.

Companion to Zhou, Bajracharya, Held, "PLAS: Latent Action Space for Offline Reinforcement Learning"
(CoRL 2020), as the PLAS baseline of Akimov et al. (arXiv 2211.11096): the PLAS column of Table 1 and
Fig. 4, and the PLAS curve of Fig. 7 (HalfCheetah, next to CNF and CNF-VAE).

    python algorithms/plas.py --env halfcheetah-medium-v2                       # D4RL (Docker image)
    python algorithms/plas.py --config_path algorithms/configs/plas/quick.yaml  # CPU quick preset
    python algorithms/plas.py --config_path algorithms/configs/plas/locomotion.yaml --env hopper-medium-replay-v2 \
        --vae_hidden 128
    python algorithms/plas.py --env walker2d-medium-expert-v2 --phi 0.05        # PLAS+P (perturbation layer)
    python algorithms/plas.py --env halfcheetah-medium-v2 --vae_checkpoint RUN/vae.pt   # skip phase 1

Phase 1 (PLAS Sec. 4.1): a conditional VAE of the behaviour policy, encoder q(z | s, a), decoder
a = dec(s, z), trained by MSE(dec(s, z), a) + 0.5 KL(q(z | s, a) || N(0, I)), then frozen.
Phase 2 (Sec. 4.2, built on TD3/BCQ): a deterministic latent policy z = pi(s) = z_max tanh(.) and
twin critics on real actions; the actor maximises Q1(s, dec(s, pi(s))) through the frozen decoder;
the critics regress on BCQ's soft clipped double-Q target
    y = r + gamma (1 - d) [0.75 min(Q1', Q2') + 0.25 max(Q1', Q2')] at a' = dec(s', pi'(s')),
with target networks for both critics and the policy. Restricting z to [-z_max, z_max]^k, where the
N(0, I) prior has its mass, keeps decoded actions close to the data. With `--phi > 0` (PLAS+P,
Sec. 4.3) a perturbation layer adds phi tanh(.) of (s, decoded action) to the decoded action.

Facts from the official code (Wenxuan-Zhou/PLAS), and choices where it or the paper leave room:
- Sizes and rates as the official main.py: VAE 750 x 2 hidden layers, latent dim 2 x action dim,
  log std clamped to [-4, 15], Adam 1e-4, batch 100, 500k steps; actor and critics 400-300 (ReLU),
  actor lr 1e-4, critic lr 1e-3, gamma 0.99, tau 0.005 (critic *and* actor targets), batch 100,
  500k updates, z_max 2 (`--max_latent_action`), lambda 0.75 (BCQ's default), phi 0.
- VAE width on medium-replay: the official code uses 750 everywhere; d3rlpy's reproduction uses
  128 on medium-replay. Both are `--vae_hidden` (configs/plas/locomotion.yaml says which to pass).
- States: official PLAS feeds raw states. The shared data plumbing normalises them (as cnf.py does);
  by default (`--no_normalize_states`) this file rebuilds the buffer's states from the raw
  observations (and evaluates on raw observations), so the networks see what the official ones do.
  `--normalize_states` gives cnf.py's normalisation (needed for a vae.pt that cnf_vae.py reuses).
  It matters on short budgets: after 10k VAE steps (configs/plas/quick.yaml), decoding z = 0 on
  halfcheetah-medium-gymv5 scores 42 with normalised states and 19 with raw ones, so the quick
  preset normalises.
- Actions: the data plumbing keeps actions in [-1, 1], so the decoder's max_action is 1 (the official
  code reads the env's bound, 1 in every D4RL locomotion and maze2d env); the decoder's tanh maps
  every latent, inside [-z_max, z_max]^k or not, into [-1, 1]^n.
- The encoder's mean and log-std heads are one linear layer with 2k outputs (the same function as
  two heads on the shared hidden layers).
- The two critics are one vectorised ensemble with one Adam (identical to two critics with one Adam
  over both: Adam is element-wise). The actor loss -Q1(s, dec(s, pi(s))) differentiates with respect
  to the action only (the critic's parameters are detached in `q1`); the official code also fills
  the critic's .grad there and zeroes it before the next critic step: the same updates, less work.
- With phi > 0 the latent policy and the perturbation layer form one actor with one Adam and one
  target network, as the official `LatentPerturbation`.
- `--amp` (off by default; not in the official code): bfloat16 matmuls in the hidden layers of the
  actor and the critics, outputs in float32; the VAE stays float32.
- Evaluation: 10 episodes every 5000 updates and the mean of the last 10 evaluations, the protocol
  the CNF paper applies to every algorithm (the official code evaluates every 1000 updates).
- Phase 1 samples batches with replacement and keeps the last VAE (no validation split, as the
  official code); it is checkpointed every `vae_save_every` steps for `--resume`.

Reading order: config, the VAE (Sec. 4.1), the latent policy, perturbation layer and critics (Sec. 4.2-4.3),
phase 1 (`VAEPretrainer`), phase 2 (`PLAS.train`), the loop (`pretrain_vae`, `train_agent`, `train`); then, below
one banner each, PLAS's extras (phase 1's bookkeeping and vae.pt, raw states) and the plumbing every file shares.
Definitions marked `# Copied from` are copies that tests/test_copies.py keeps identical to their source (cnf_vae.py
copies the VAE, its pre-training and their bookkeeping from here).
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ALGORITHM = "plas"


@dataclass
class TrainConfig:
    # --- data ---
    normalize_states: bool = False  # official PLAS: raw states; true: cnf.py's normalisation (mean, std + 1e-3)
    # --- phase 1: conditional VAE of the behaviour policy (PLAS Sec. 4.1) ---
    vae_checkpoint: Optional[str] = None  # a vae.pt from an earlier run (plas.py or cnf_vae.py): skip phase 1
    vae_hidden: int = 750  # encoder and decoder width, 2 hidden layers (official 750; d3rlpy: 128 on medium-replay)
    vae_steps: int = 500_000  # pre-training steps (official 500k)
    vae_batch_size: int = 100  # pre-training batch size (official 100)
    vae_lr: float = 1e-4  # Adam learning rate (official 1e-4)
    vae_kl_weight: float = 0.5  # weight of the KL term of the loss (official 0.5)
    vae_save_every: int = 50_000  # steps between phase-1 checkpoints (official: a saved VAE every 50k)
    # --- phase 2: deterministic latent policy and twin critics (PLAS Sec. 4.2) ---
    actor_lr: float = 1e-4  # latent policy (and perturbation layer) learning rate (official 1e-4)
    critic_lr: float = 1e-3  # critic learning rate (official 1e-3)
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # Polyak rate of the target critics and the target policy (official 0.005)
    target_lambda: float = 0.75  # soft clipped double Q: lambda min(Q1', Q2') + (1 - lambda) max(Q1', Q2')
    z_max: float = 2.0  # latent policy range [-z_max, z_max]^k (official --max_latent_action 2)
    phi: float = 0.0  # perturbation bound; 0: no perturbation layer (PLAS), 0.05: PLAS+P (official README)
    # --- schedule ---
    train_steps: int = 500_000  # phase-2 gradient updates (official: 500k, after 500k VAE steps; CNF paper's CNF: 1M)
    batch_size: int = 100  # phase-2 batch size (official: 100; the CNF paper's grid for CNF: {256, 512, 1024})
    eval_every: int = 5_000  # updates between evaluations (official: 1000; the CNF paper's protocol: 5000)
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


# %% Networks: the MLPs every file shares, then PLAS's conditional VAE (Sec. 4.1)
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


class ConditionalVAE(nn.Module):
    """PLAS's model of the behaviour policy (Sec. 4.1). Encoder q(z | s, a) = N(mean, exp(log_std)^2):
    (s, a) -> hidden -> hidden (ReLU) -> (mean, log_std), log_std clamped to [-4, 15]. Decoder
    a = tanh(MLP(s, z)): (s, z) -> hidden -> hidden (ReLU) -> a; the tanh puts every decoded action
    inside [-1, 1]^n (the data's action box, max_action = 1) whatever the latent. Latent dim k = 2 n."""

    def __init__(self, action_dim: int, state_dim: int, hidden: int, latent_dim: Optional[int] = None):
        super().__init__()
        self.action_dim, self.state_dim, self.hidden = action_dim, state_dim, hidden
        self.latent_dim = latent_dim or 2 * action_dim
        self.encoder = mlp(state_dim + action_dim, 2 * self.latent_dim, hidden, 3)
        self.decoder = mlp(state_dim + self.latent_dim, action_dim, hidden, 3)

    def encode(self, actions: torch.Tensor, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> mean, log_std of q(z | s, a), [B, k] each."""
        mean, log_std = self.encoder(torch.cat([states, actions], dim=-1)).chunk(2, dim=-1)
        return mean, log_std.clamp(-4.0, 15.0)

    def decode(self, latents: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """a = dec(s, z) in [-1, 1]^n, for any latent z [B, k]."""
        return torch.tanh(self.decoder(torch.cat([states, latents], dim=-1)))

    def elbo_terms(self, actions: torch.Tensor, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction MSE of a reparameterised z ~ q(z | s, a), and KL(q(z | s, a) || N(0, I)),
        both element means (as the official code)."""
        mean, log_std = self.encode(actions, states)
        latents = mean + log_std.exp() * torch.randn_like(mean)
        reconstruction = F.mse_loss(self.decode(latents, states), actions)
        kl = -0.5 * (1.0 + 2.0 * log_std - mean.pow(2) - torch.exp(2.0 * log_std)).mean()
        return reconstruction, kl

    @torch.no_grad()
    def freeze(self) -> "ConditionalVAE":
        """For phase 2: no gradients into the VAE (gradients still flow through it to the latents)."""
        self.requires_grad_(False)
        self.eval()
        return self

    def describe(self) -> dict:
        return {"action_dim": self.action_dim, "state_dim": self.state_dim, "hidden": self.hidden,
                "latent_dim": self.latent_dim}


# %% PLAS's actor and critics: latent policy, perturbation layer, 400-300 critics (Sec. 4.2-4.3)
HIDDEN = (400, 300)  # actor, perturbation layer and critic widths (official)


def mlp_widths(in_dim: int, widths: Sequence[int], out_dim: int) -> nn.Sequential:
    """Linear layers in_dim -> widths... -> out_dim with ReLU between them."""
    dims = [in_dim, *widths, out_dim]
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LatentPolicy(nn.Module):
    """Deterministic z = pi(s) = z_max * tanh(MLP(s)), s -> 400 -> 300 -> k (Sec. 4.2)."""

    def __init__(self, state_dim: int, latent_dim: int, z_max: float, amp: bool = False):
        super().__init__()
        self.net, self.z_max, self.amp = mlp_widths(state_dim, HIDDEN, latent_dim), z_max, amp

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            raw = self.net(states).float()
        return self.z_max * torch.tanh(raw)


class Perturbation(nn.Module):
    """PLAS+P's perturbation xi(s, a) = phi * tanh(MLP(s, a)), (s, a) -> 400 -> 300 -> n (Sec. 4.3)."""

    def __init__(self, state_dim: int, action_dim: int, phi: float, amp: bool = False):
        super().__init__()
        self.net, self.phi, self.amp = mlp_widths(state_dim + action_dim, HIDDEN, action_dim), phi, amp

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            raw = self.net(torch.cat([states, actions], dim=-1)).float()
        return self.phi * torch.tanh(raw)


class Actor(nn.Module):
    """The policy a = dec(s, pi(s)); with phi > 0, a = clamp(dec(s, pi(s)) + xi(s, dec(s, pi(s))), -1, 1)."""

    def __init__(self, state_dim: int, action_dim: int, latent_dim: int, z_max: float, phi: float, amp: bool = False):
        super().__init__()
        self.latent_policy = LatentPolicy(state_dim, latent_dim, z_max, amp)
        self.perturbation = Perturbation(state_dim, action_dim, phi, amp) if phi > 0 else None

    def forward(self, states: torch.Tensor, vae: ConditionalVAE) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (latents [B, k], actions [B, n]); the VAE is passed in, so it is not part of the actor."""
        latents = self.latent_policy(states)
        actions = vae.decode(latents, states)
        if self.perturbation is not None:
            actions = (actions + self.perturbation(states, actions)).clamp(-1.0, 1.0)
        return latents, actions


class TwinCritic400300(nn.Module):
    """Q1 and Q2, each (s, a) -> 400 -> 300 -> 1 (ReLU), as one vectorised ensemble: -> [2, B, 1] (float32).
    (The shared TwinCritic has one width for all layers; PLAS's critics narrow from 400 to 300.) With `amp`
    only the hidden layers run in bfloat16; the output layer stays float32, as the shared TwinCritic's."""

    def __init__(self, state_dim: int, action_dim: int, amp: bool = False):
        super().__init__()
        dims = [state_dim + action_dim, *HIDDEN, 1]
        self.layers = nn.ModuleList(VectorizedLinear(dims[i], dims[i + 1], ensemble=2) for i in range(len(dims) - 1))
        self.amp = amp  # bfloat16 matmuls

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([states, actions], dim=-1).unsqueeze(0).expand(2, -1, -1)
        *hidden_layers, output_layer = self.layers
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for layer in hidden_layers:
                x = F.relu(layer(x))
        return output_layer(x.float())

    def q1(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q1 alone [B, 1], its parameters detached: a loss on it differentiates the actions only."""
        x = torch.cat([states, actions], dim=-1)
        *hidden_layers, output_layer = self.layers
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for layer in hidden_layers:
                x = F.relu(torch.addmm(layer.bias[0].detach(), x, layer.weight[0].detach()))
        return torch.addmm(output_layer.bias[0].detach(), x.float(), output_layer.weight[0].detach())


# %% Phase 1: VAE pre-training (PLAS Sec. 4.1)
class VAEPretrainer:
    """Loss = MSE(dec(s, z), a) + kl_weight * KL, Adam; one `train` call = one step."""

    def __init__(self, vae: ConditionalVAE, config: TrainConfig):
        self.vae, self.config = vae, config
        self.optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)

    def train(self, actions: torch.Tensor, states: torch.Tensor) -> Dict[str, torch.Tensor]:
        reconstruction, kl = self.vae.elbo_terms(actions, states)
        loss = reconstruction + self.config.vae_kl_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"vae/loss": loss.detach(), "vae/reconstruction": reconstruction.detach(), "vae/kl": kl.detach()}

    def state_dict(self) -> dict:
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])


# %% Phase 2: the latent policy and the critics (PLAS Sec. 4.2)
class PLAS:
    """Deterministic latent policy and twin critics through the frozen decoder; `train(batch)` is one update."""

    def __init__(self, vae: ConditionalVAE, state_dim: int, action_dim: int, config: TrainConfig):
        self.vae = vae.freeze()
        self.config = config
        self.actor = Actor(state_dim, action_dim, vae.latent_dim, config.z_max, config.phi, config.amp)
        self.actor.to(config.device)
        self.target_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = TwinCritic400300(state_dim, action_dim, config.amp).to(config.device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=fused)
        self.targets = list(self.target_critic.parameters()) + list(self.target_actor.parameters())
        self.sources = list(self.critic.parameters()) + list(self.actor.parameters())

    @torch.no_grad()
    def target_values(self, rewards: torch.Tensor, next_states: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        """BCQ's soft clipped double Q: y = r + gamma (1 - d) [lambda min_i Q_i'(s', a') + (1 - lambda)
        max_i Q_i'(s', a')], a' = the target actor's action dec(s', pi'(s')). -> [B, 1]"""
        _, next_actions = self.target_actor(next_states, self.vae)
        low, high = torch.aminmax(self.target_critic(next_states, next_actions), dim=0)  # [B, 1] each
        lam = self.config.target_lambda
        return rewards + self.config.gamma * (1.0 - dones) * (lam * low + (1.0 - lam) * high)

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        """One update: the critics on the soft clipped double-Q target, then the actor against the updated Q1,
        then Polyak averaging of both targets."""
        states, actions, rewards, next_states, dones = batch
        target = self.target_values(rewards, next_states, dones)
        q = self.critic(states, actions)  # [2, B, 1]
        critic_loss = ((q - target) ** 2).mean(dim=(1, 2)).sum()  # MSE of Q1 plus MSE of Q2
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        # Actor: maximise Q1(s, dec(s, pi(s))) with the updated critic, through the frozen decoder.
        latents, policy_actions = self.actor(states, self.vae)
        actor_loss = -self.critic.q1(states, policy_actions).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        with torch.no_grad():  # Polyak averaging of the target critics and target actor, one fused op
            torch._foreach_lerp_(self.targets, self.sources, self.config.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(),
                "q_mean": q.detach().mean(), "latent_abs_mean": latents.detach().abs().mean()}

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Evaluation: a = dec(s, pi(s)) (plus the perturbation when phi > 0)."""
        return self.actor(states, self.vae)[1]

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "target_actor": self.target_actor.state_dict(),
                "critic": self.critic.state_dict(), "target_critic": self.target_critic.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.target_actor.load_state_dict(state["target_actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])


# %% The loop: phase 1's, phase 2's, and train(config) that runs both
def pretrain_vae(config: TrainConfig, buffer: "ReplayBuffer", run: "Run") -> ConditionalVAE:
    """Phase 1: `vae_steps` steps on batches drawn with replacement from all the data (no validation split, as the
    official code); returns the last VAE (also written to RUN_DIR/vae.pt)."""
    vae = ConditionalVAE(buffer.actions.shape[1], buffer.states.shape[1], config.vae_hidden).to(config.device)
    trainer = VAEPretrainer(vae, config)
    progress = VAEProgress.start(run, trainer)  # a resumed run continues from its checkpoint (below)

    def vae_step() -> Dict[str, torch.Tensor]:
        idx = torch.randint(0, buffer.size, (config.vae_batch_size,), device=config.device)
        return trainer.train(buffer.actions[idx], buffer.states[idx])

    update = compiled(vae_step, config)
    for step in progress.steps(config.vae_steps):
        progress.add(update())
        if step % config.log_every == 0 or step == config.vae_steps:
            progress.log()  # the mean losses since the last log
        if step % config.vae_save_every == 0 or step == config.vae_steps:
            progress.checkpoint()
    return progress.saved_vae(buffer)


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
    """Phase 1 (or its saved VAE) on raw or normalised states, phase 2, evaluations, checkpoints;
    returns the results.json path."""
    data = load_offline_data(config)
    run = start_run(config, data)
    buffer = ReplayBuffer(data, config.device)
    if not config.normalize_states:
        use_raw_states(buffer, data)  # official PLAS: the networks see raw states (below)
    vae, checkpoint = vae_for_phase_2(config, buffer, run)  # phase 1, or its vae.pt (below)
    agent = PLAS(vae, buffer.states.shape[1], buffer.actions.shape[1], config)
    results = train_agent(agent, buffer, run, checkpoint, desc="phase 2: RL")
    return finish_run(run, {**results, "vae_final_loss": vae_final_loss(run.dir)})


# ==== PLAS extras: phase 1's bookkeeping and its result (vae.pt), raw states ====


class VAEProgress:
    """Phase 1's bookkeeping for `pretrain_vae` (cnf.py's FlowProgress without a validation split): resume from a
    phase-1 checkpoint, the logged losses (summed on the device: no sync per step; logged as means since the last
    log), the checkpoints (a polite stop checkpoints any step), and the last VAE written to RUN_DIR/vae.pt."""

    def __init__(self, run: "Run", trainer: VAEPretrainer):
        self.run, self.trainer = run, trainer
        self.step, self.last_loss, self.sums, self.since_log = 0, None, {}, 0

    @classmethod
    def start(cls, run: "Run", trainer: VAEPretrainer) -> "VAEProgress":
        progress, checkpoint = cls(run, trainer), run.checkpoint
        run.phase = "vae"
        if checkpoint is not None:
            trainer.load_state_dict(checkpoint["pretrainer"])
            progress.step, progress.last_loss = checkpoint["step"], checkpoint["last_loss"]
            progress.sums, progress.since_log = checkpoint.get("loss_sums", {}), checkpoint.get("since_log", 0)
            set_rng_state(checkpoint["rng"])  # the resumed run draws the batches the uninterrupted one would
        run.checkpoint_state = progress.state  # a polite stop checkpoints any step, the losses since the log too
        return progress

    def state(self) -> dict:
        return {"pretrainer": self.trainer.state_dict(), "last_loss": self.last_loss, "loss_sums": self.sums,
                "since_log": self.since_log}

    def steps(self, total: int):
        return self.run.steps(self.step, total, "phase 1: VAE")

    def add(self, losses: Dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.since_log += 1

    def log(self) -> None:
        means = {key: value.item() / self.since_log for key, value in self.sums.items()}
        self.run.logger.log(means, self.run.step, "vae")
        self.sums, self.since_log, self.last_loss = {}, 0, means["vae/loss"]

    def checkpoint(self) -> None:
        self.run.save_checkpoint(self.state())

    def saved_vae(self, buffer: "ReplayBuffer") -> ConditionalVAE:
        vae, mean, std = self.trainer.vae, torch.from_numpy(buffer.state_mean), torch.from_numpy(buffer.state_std)
        save_atomic({"vae": vae.state_dict(), "sizes": vae.describe(), "final_loss": self.last_loss,
                     "state_mean": mean, "state_std": std}, self.run.dir / "vae.pt")
        return vae


def load_vae(path: str, buffer: "ReplayBuffer", device: str) -> ConditionalVAE:
    """A vae.pt written by phase 1 (weights, sizes, and the states it was trained on)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: VAE checkpoint {path} does not exist")
    saved = torch_load(path)
    vae = ConditionalVAE(**saved["sizes"])
    if (vae.action_dim, vae.state_dim) != (buffer.actions.shape[1], buffer.states.shape[1]):
        raise SystemExit(f"error: VAE checkpoint {path} was trained for {vae.action_dim}-dim actions and "
                         f"{vae.state_dim}-dim states; this data has {buffer.actions.shape[1]} and "
                         f"{buffer.states.shape[1]}")
    if not (np.allclose(saved["state_mean"].numpy(), buffer.state_mean, atol=1e-4)
            and np.allclose(saved["state_std"].numpy(), buffer.state_std, atol=1e-4)):
        raise SystemExit(f"error: VAE checkpoint {path} saw other states (raw vs normalised, or another dataset); "
                         f"pre-train one for this run (plas.py --normalize_states matches cnf_vae.py)")
    vae.load_state_dict(saved["vae"])
    return vae.to(device)


def vae_for_phase_2(config: TrainConfig, buffer: "ReplayBuffer", run: "Run") -> Tuple[ConditionalVAE, Optional[dict]]:
    """Phase 1, or its result (--vae_checkpoint, or the vae.pt of a run resumed in phase 2).
    Returns the VAE and the checkpoint phase 2 resumes from (None: phase 2 starts fresh)."""
    if config.vae_checkpoint is not None:
        return load_vae(config.vae_checkpoint, buffer, config.device), run.checkpoint
    if run.checkpoint is not None and run.checkpoint["phase"] == "rl":
        return load_vae(str(run.dir / "vae.pt"), buffer, config.device), run.checkpoint
    return pretrain_vae(config, buffer, run), None


def vae_final_loss(run_dir: Path) -> Optional[float]:
    """Phase 1's last logged loss, from RUN_DIR/vae.pt (None when --vae_checkpoint skipped phase 1)."""
    vae_file = run_dir / "vae.pt"
    return torch_load(vae_file)["final_loss"] if vae_file.exists() else None


def use_raw_states(buffer: "ReplayBuffer", data: "OfflineData") -> None:
    """Official PLAS sees raw states: replace the buffer's normalised states by the observations
    themselves, and make the normalisation that evaluation applies the identity (mean 0, std 1)."""
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=buffer.device)  # noqa: E731
    buffer.states, buffer.next_states = as_tensor(data.observations), as_tensor(data.next_observations)
    buffer.state_mean = np.zeros_like(buffer.state_mean)
    buffer.state_std = np.ones_like(buffer.state_std)


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
