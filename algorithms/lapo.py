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
Data sources (`--env`, `--dataset_path`, bundled `*-gymv5` datasets) and evaluation are the shared plumbing's
(the `data` block below).

Deviations from the official code, and choices where it is silent (the numbers of an update are the same
unless said otherwise):
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
- No host syncs: `train(batch)` returns tensors, read only every `log_every` updates. The official code
  asserts |mean(y)| < 1e6 after every 5000 updates; not done here.
- The official `--no_noise` flag is parsed but never read (the V target always has the noise): not offered.
  The official LAPO class defaults (lambda 0.8, expectile 0.8, lr 1e-4 / 5e-4) are overridden by its
  main_d4rl.py arguments, whose values are the defaults here.
- Evaluation: 10 episodes every 5000 updates (as the official code), stepped together in a vector env
  seeded with `--seed`; the score is the mean of the last 10 evaluations (the CNF paper's protocol).
- Batches and the target noise are drawn with torch on the training device (official: numpy batches on
  the host). Same law. Seeds 0, 1, 2 (the official README: 123, 456, 789).
- `--amp` (off by default): bfloat16 matmuls in the hidden layers; the output layers, losses, advantages and
  targets stay float32 (the shared TwinCritic runs its output layer in bfloat16 and returns float32).

Reading order: config, networks, the update (`LAPO.train`), the data as LAPO sees it, the loop; then, below
one banner, the plumbing every file shares. tests/test_copies.py checks the `[block: ...]` copies.
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
    # --- schedule (the experiment's shared fields follow) ---
    train_steps: int = 1_000_000  # gradient updates (official: 1M)
    batch_size: int = 512  # batch size (official: 512)
    eval_every: int = 5_000  # updates between evaluations (official: 5000)
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


# %% Networks: the MLPs and twin critics every file shares, then LAPO's CVAE, latent policy and critics
# ---- [block: networks | copied from cnf.py] ----
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
# ---- [end block: networks] ----


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

    def state_dict(self) -> dict:
        return {"vae": self.vae.state_dict(), "target_decoder": self.target_decoder.state_dict(),
                "actor": self.actor.state_dict(), "target_actor": self.target_actor.state_dict(),
                "critic": self.critic.state_dict(), "target_critic": self.target_critic.state_dict(),
                "vae_optimizer": self.vae_optimizer.state_dict(), "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("vae", "target_decoder", "actor", "target_actor", "critic", "target_critic",
                     "vae_optimizer", "actor_optimizer", "critic_optimizer"):
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
    if scaling == "antmaze":
        value_range = (0.0, 100.0)
    else:
        value_range = (float(rewards.min()) / (1.0 - gamma), float(rewards.max()) / (1.0 - gamma))
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


# %% The loop
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


# ---- [block: rl loop | copied from cnf.py] ----
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
# ---- [end block: rl loop] ----


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
