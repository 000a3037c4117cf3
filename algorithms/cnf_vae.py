"""CNF-VAE: CNF's Algorithm 2 with PLAS's pre-trained conditional VAE decoder in place of the flow.

Companion to Akimov et al., "Let Offline RL Flow" (arXiv 2211.11096), Fig. 7: the ablation that
keeps everything of CNF except the action decoder, compared with CNF (cnf.py) and PLAS (plas.py)
on HalfCheetah.

    python algorithms/cnf_vae.py --env halfcheetah-medium-v2 --train_steps 200000   # D4RL (Docker image)
    python algorithms/cnf_vae.py --config_path algorithms/configs/cnf_vae/quick.yaml  # CPU quick preset
    python algorithms/cnf_vae.py --env halfcheetah-medium-v2 --vae_checkpoint RUN/vae.pt   # skip phase 1

Phase 1: PLAS's conditional VAE (encoder q(z | s, a), decoder a = dec(s, z) = tanh(MLP(s, z)),
latent dim k = 2 x action dim), trained as plas.py trains it (the VAE blocks are copies of
plas.py's), then frozen. Phase 2: cnf.py's update with dec(s, z) where cnf.py has f^-1(z | s):
- latent policy z = z_max tanh(N(mu(s), sigma(s))), log sigma clamped to [-20, 2]: CNF's
  tanh-Gaussian, stretched to the VAE's latent range (z_max 2, PLAS's `max_latent_action`);
- critic target y = r + gamma (1 - d) min_i Q_i'(s', dec(s', z')), z' ~ pi(. | s') (Eq. 6);
- advantage A(s, a) = Q(s, a) - Q(s, dec(s, z)), Q = min(Q1, Q2), z ~ pi(. | s) (Eq. 7);
- policy loss mean(min(exp(A / lambda), 100) |a - dec(s, z)|), gradients through the frozen decoder (Eq. 8);
- acting: a = dec(s, z_max tanh(mu(s))).
Data sources and state normalisation: see the comment above `load_offline_data`.

Choices where the paper is silent:
- The paper does not describe how Fig. 7's VAE was trained; this file takes PLAS's official
  recipe (750 x 2 hidden layers, Adam 1e-4, batch 100, 500k steps, MSE + 0.5 KL; see plas.py).
- The VAE's prior N(0, I) has no bounded support, so a bound must be chosen for the latent
  policy: z_max = 2 as PLAS (`--z_max`). The decoder's tanh keeps every action inside [-1, 1]^n;
  staying close to the data is what z_max alone has to ensure, unlike CNF's Uniform latent box.
- States are normalised as in cnf.py, for the VAE too; a vae.pt from plas.py fits only if that run
  used `--normalize_states` (load_vae refuses a VAE trained on other states).
- `--amp` runs the actor's and the critics' hidden layers in bfloat16, as cnf.py; the VAE stays float32.
- Everything else (twin critics as one vectorised ensemble, hyperparameters, one latent sample for
  the advantage baseline and the policy loss, fused Adams, evaluation, checkpoints) is cnf.py's.

Reading order: config, the VAE (copied from plas.py), the stretched latent policy, phase 1, phase 2
(`CNFVAE.train`: cnf.py's update), the loop; then, below one banner, the plumbing every file shares.
tests/test_copies.py checks the `[block: ...]` copies.
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

ALGORITHM = "cnf_vae"


@dataclass
class TrainConfig:
    # ---- [block: vae config | copied from plas.py] -------------------------------------------------
    # --- phase 1: conditional VAE of the behaviour policy (PLAS Sec. 4.1) ---
    vae_checkpoint: Optional[str] = None  # a vae.pt from an earlier run (plas.py or cnf_vae.py): skip phase 1
    vae_hidden: int = 750  # encoder and decoder width, 2 hidden layers (official 750; d3rlpy: 128 on medium-replay)
    vae_steps: int = 500_000  # pre-training steps (official 500k)
    vae_batch_size: int = 100  # pre-training batch size (official 100)
    vae_lr: float = 1e-4  # Adam learning rate (official 1e-4)
    vae_kl_weight: float = 0.5  # weight of the KL term of the loss (official 0.5)
    vae_save_every: int = 50_000  # steps between phase-1 checkpoints (official: a saved VAE every 50k)
    # ---- [end block: vae config] -------------------------------------------------------------------
    # ---- [block: rl config | copied from cnf.py] ---------------------------------------------------
    # --- phase 2: RL in the latent space (Algorithm 2, Eqs. 6-8; Table 2) ---
    hidden_dim: int = 256  # actor and critic width
    n_layers: int = 4  # linear layers in actor and critics (paper: {3, 4})
    actor_lr: float = 3e-4  # policy learning rate
    critic_lr: float = 3e-4  # critic learning rate
    gamma: float = 0.99  # discount
    tau: float = 2e-3  # Polyak rate of the target critics
    awac_lambda: float = 1.0 / 3.0  # temperature lambda of exp(A / lambda) (maze2d: 1/10)
    exp_adv_max: float = 100.0  # clamp of the advantage weights (official code)
    # ---- [end block: rl config] --------------------------------------------------------------------
    z_max: float = 2.0  # latent policy range: z = z_max * tanh(N(mu, sigma)) (PLAS's max_latent_action)
    train_steps: int = 1_000_000  # phase-2 gradient updates (paper: 1M; HalfCheetah 200k)
    batch_size: int = 512  # phase-2 batch size (paper: {256, 512, 1024}; maze2d 10240)
    eval_every: int = 5_000  # updates between evaluations
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


# %% Networks: the MLPs and twin critics every file shares, PLAS's conditional VAE, the latent policy
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


# ---- [block: vae | copied from plas.py] ------------------------------------------------------------
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
# ---- [end block: vae] ------------------------------------------------------------------------------


class LatentPolicy(nn.Module):
    """pi(z | s) = z_max * tanh(N(mu(s), sigma(s))), log sigma clamped to [-20, 2]; acting uses
    z_max * tanh(mu). CNF's policy, stretched from (-1, 1)^k to the VAE's range (-z_max, z_max)^k."""

    def __init__(self, state_dim: int, latent_dim: int, hidden: int, n_layers: int, z_max: float, amp: bool = False):
        super().__init__()
        self.net, self.z_max, self.amp = mlp(state_dim, 2 * latent_dim, hidden, n_layers), z_max, amp

    # ---- [block: latent gaussian | copied from cnf.py] ----
    def mean_log_std(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=self.amp):
            mean, log_std = self.net(states).float().chunk(2, dim=-1)
        return mean, log_std.clamp(-20.0, 2.0)
    # ---- [end block: latent gaussian] ----

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """A reparameterised sample z (gradients flow to mu and sigma)."""
        mean, log_std = self.mean_log_std(states)
        return self.z_max * torch.tanh(mean + log_std.exp() * torch.randn_like(mean))

    def deterministic(self, states: torch.Tensor) -> torch.Tensor:
        return self.z_max * torch.tanh(self.mean_log_std(states)[0])


# %% Phase 1: VAE pre-training (PLAS Sec. 4.1, as plas.py)
# ---- [block: vae pretraining | copied from plas.py] ------------------------------------------------
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
# ---- [end block: vae pretraining] ------------------------------------------------------------------


# %% Phase 2: CNF's Algorithm 2 with the VAE decoder
class CNFVAE:
    """Latent policy and twin critics trained through the frozen VAE decoder; `train(batch)` is one update."""

    def __init__(self, vae: ConditionalVAE, state_dim: int, action_dim: int, config: TrainConfig):
        self.vae = vae.freeze()
        self.config = config
        self.actor = LatentPolicy(state_dim, vae.latent_dim, config.hidden_dim, config.n_layers, config.z_max,
                                  config.amp)
        self.actor.to(config.device)
        # ---- [block: critics and optimizers | copied from cnf.py] ----------------------------------
        self.critic = TwinCritic(state_dim, action_dim, config.hidden_dim, config.n_layers, config.amp)
        self.critic.to(config.device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=fused)
        # ---- [end block: critics and optimizers] ---------------------------------------------------

    # cnf.py's update (Eqs. 6-8); read its f^-1(z | s) as the VAE's decoder dec(s, z).
    # ---- [block: cnf update | copied from cnf.py | renames: flow->vae] -----------------------------
    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        states, actions, rewards, next_states, dones = batch
        cfg = self.config
        # Shapes are one agent's; cnf.py's --seeds (SeedCNF) puts a seed axis in front ([N, B, 1]): hence dims
        # counted from the end, and each loss kept per seed and summed for the backward pass.
        # Eq. 6, critic target: y = r + gamma (1 - d) min_i Q_i'(s', f^-1(z' | s')), z' ~ pi(. | s').
        with torch.no_grad():
            next_actions = self.vae.decode(self.actor(next_states), next_states)
            next_q = self.target_critic(next_states, next_actions).min(0).values  # [B, 1]
            # ---- [block: critic step] ---------------------------------------------------------------
            target = rewards + cfg.gamma * (1.0 - dones) * next_q
        q = self.critic(states, actions)  # [2, B, 1]
        critic_loss = ((q - target) ** 2).mean(dim=(-2, -1)).sum(0)  # MSE of Q1 plus MSE of Q2
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.sum().backward()
        self.critic_optimizer.step()
        # ---- [end block: critic step] -----------------------------------------------------------------

        # The policy's action, decoded through the frozen vae with gradients to the policy.
        policy_actions = self.vae.decode(self.actor(states), states)  # [B, act_dim]
        # Eq. 7, advantage A(s, a) = Q(s, a) - Q(s, f^-1(z | s)), Q = min(Q1, Q2), with the updated
        # critics, both actions in one batched pass.
        with torch.no_grad():
            both = self.critic(torch.cat([states, states], -2), torch.cat([actions, policy_actions], -2))
            q_data, q_policy = both.min(0).values.chunk(2, -2)  # [B, 1] each
            weights = torch.exp((q_data - q_policy) / cfg.awac_lambda).clamp(max=cfg.exp_adv_max)
        # Eq. 8, policy loss: advantage-weighted L1 distance between data and decoded actions.
        actor_loss = (weights * (actions - policy_actions).abs()).mean(dim=(-2, -1))
        # ---- [block: actor step and target update] -------------------------------------------------
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.sum().backward()
        self.actor_optimizer.step()

        with torch.no_grad():  # Polyak averaging of the target critics, one fused op
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), cfg.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(),
                "q_mean": q.detach().mean(dim=(0, -2, -1)), "adv_weight_mean": weights.mean(dim=(-2, -1))}
        # ---- [end block: actor step and target update] ---------------------------------------------
    # ---- [end block: cnf update] -------------------------------------------------------------------

    @torch.no_grad()
    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Evaluation: a = dec(s, z_max tanh(mu(s)))."""
        return self.vae.decode(self.actor.deterministic(states), states)

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


# %% The loop: phase 1's, phase 2's, and train(config) that runs both
# ---- [block: vae pretraining loop | copied from plas.py] -------------------------------------------
def pretrain_vae(config: TrainConfig, buffer: "ReplayBuffer", run: "Run", checkpoint: Optional[dict]) -> ConditionalVAE:
    """Phase 1: returns the VAE after `vae_steps` steps; writes it to RUN_DIR/vae.pt."""
    from tqdm import trange

    device = config.device
    vae = ConditionalVAE(buffer.actions.shape[1], buffer.states.shape[1], config.vae_hidden).to(device)
    trainer = VAEPretrainer(vae, config)
    start, last_loss = 0, None
    run.phase = "vae"
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint["pretrainer"])
        start, last_loss = checkpoint["step"], checkpoint["last_loss"]
        set_rng_state(checkpoint["rng"])  # the resumed run draws the batches the uninterrupted one would

    def vae_step() -> Dict[str, torch.Tensor]:
        idx = torch.randint(0, buffer.size, (config.vae_batch_size,), device=device)
        return trainer.train(buffer.actions[idx], buffer.states[idx])

    update = compiled(vae_step, config)
    sums, since_log = {}, 0  # summed on the device: no sync per step
    for step in trange(start + 1, config.vae_steps + 1, desc="phase 1: VAE", initial=start,
                       total=config.vae_steps, mininterval=5):
        run.step = step
        for key, value in update().items():
            sums[key] = sums[key] + value if key in sums else value
        since_log += 1
        if step % config.log_every == 0 or step == config.vae_steps:
            means = {key: value.item() / since_log for key, value in sums.items()}
            run.logger.log(means, step, "vae")
            sums, since_log, last_loss = {}, 0, means["vae/loss"]
        if step % config.vae_save_every == 0 or step == config.vae_steps:
            run.save_checkpoint({"pretrainer": trainer.state_dict(), "last_loss": last_loss})
    save_atomic({"vae": vae.state_dict(), "sizes": vae.describe(), "final_loss": last_loss,
                 "state_mean": torch.from_numpy(buffer.state_mean), "state_std": torch.from_numpy(buffer.state_std)},
                run.dir / "vae.pt")
    return vae
# ---- [end block: vae pretraining loop] -------------------------------------------------------------


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


# ---- [block: phase 1 result | copied from plas.py] -------------------------------------------------
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
    return pretrain_vae(config, buffer, run, run.checkpoint), None


def vae_final_loss(run: "Run") -> Optional[float]:
    """Phase 1's last logged loss, for results.json (None when --vae_checkpoint skipped phase 1)."""
    vae_file = run.dir / "vae.pt"
    return torch_load(vae_file)["final_loss"] if vae_file.exists() else None
# ---- [end block: phase 1 result] -------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    """Phase 1 (or its saved VAE), phase 2, evaluations, checkpoints; returns the results.json path."""
    data = load_offline_data(config)
    run = start_run(config, data)
    buffer = ReplayBuffer(data, config.device)
    vae, checkpoint = vae_for_phase_2(config, buffer, run)
    agent = CNFVAE(vae, buffer.states.shape[1], buffer.actions.shape[1], config)
    results = train_agent(agent, buffer, run, checkpoint, desc="phase 2: RL")
    return finish_run(run, {**results, "vae_final_loss": vae_final_loss(run)})


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
