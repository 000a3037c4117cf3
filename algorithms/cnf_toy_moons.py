"""Why a bounded latent space: the 2-D "moons" toy of Figs. 2 and 3, Normal vs Uniform latent.

Companion to Akimov et al., "Let Offline RL Flow: Training Conservative Agents in the Latent Space
of Normalizing Flows" (arXiv 2211.11096): Fig. 2 (densities and samples of two flows fitted to the
same data) and Fig. 3 (samples of the Normal-latent flow from a * N(0, I), a = 1, 1.5, 2, 3, 4: the
larger a latent policy may push its latents, the more decoded points leave the data; the paper's
point is that the Uniform flow's latents live in a box whose points decode onto the data).

    python algorithms/cnf_toy_moons.py --out_dir runs/toy_moons        # about 1-2 minutes on 2 CPU cores
    python algorithms/cnf_toy_moons.py --steps 500 --n_train 2000       # a quick look

Writes into --out_dir: fig2_densities_samples.png, fig3_ood_amplitudes.png and toy_moons.json, and
prints `results: <path of toy_moons.json>` as the last line.

Data: scikit-learn's make_moons (n_train points, Gaussian noise `noise`), squeezed linearly into
(-1, 1)^2 by a per-axis min-max map onto [-squeeze, squeeze] = [-0.95, 0.95], fitted on the training
points (the same map is applied to the fresh validation and reference points, which may therefore
stick out of [-0.95, 0.95] slightly; all lie well inside (-1, 1)). The models are unconditional
versions of cnf.py's flow, with cnf.py's blocks (ActNorm -> LU invertible linear -> affine
coupling, copied verbatim below): the condition is an empty [batch, 0] tensor, so each coupling's
conditioner sees only the kept half (a 2-D point: one coordinate conditions the other, alternating).
- Normal latent ("NF"): data -> atanh -> K blocks -> z, base N(0, I). Samples: z = a * eps,
  eps ~ N(0, I), decoded through the blocks and tanh. Note that the atanh first layer keeps even
  these samples inside (-1, 1)^2: an out-of-distribution point is one far from the moons, and at
  large a the decoded points pile up along the box's edges.
- Uniform latent (CNF): data -> atanh -> K blocks -> tanh -> z, base Uniform(-1, 1)^2. Samples:
  z ~ Uniform(-1, 1)^2 (the whole box a latent policy may use: "box"), and z on the boundary of the
  square max_i |z_i| = d for d in `edge_depths` = 0.9, 0.99, 0.999, 1 ("edge_<d>"; d = 1 is the box's
  own edge, clamped to 1 - 1e-5 by the flow as in cnf.py): where a tanh-Gaussian policy whose mean
  saturates would put its latents. Both models' decoded points are clamped to [-1 + 1e-5, 1 - 1e-5]
  as cnf.py's decode does.

Out-of-distribution metric (the paper shows the points and gives no number; this is ours): a
sample is out of distribution when its Euclidean distance, in the squeezed (-1, 1)^2 coordinates,
to the nearest training point exceeds a threshold t set from the training data itself: t = the
`ood_quantile` (0.99) quantile of the training points' nearest-neighbour distances (each point to
its nearest *other* training point). Fresh draws of the data distribution are thus out of
distribution about 1% of the time; the JSON reports that calibration measured on `n_samples` fresh
make_moons points ("reference_fresh_moons"), so a model's fraction reads against it.

JSON fields: ood_fraction.normal{"1", "1.5", "2", "3", "4"} (per amplitude a), ood_fraction.uniform
{"box", "edge_0.9", "edge_0.99", "edge_0.999", "edge_1"}, ood_fraction.reference_fresh_moons,
ood_threshold, nll{normal, uniform}{train, valid} (nats per point in data space, comparable between
the models; train = mean over the last 10% of steps, valid = n_train fresh points) and nll_history,
uniform_training_latents_beyond_edge (the fraction of training points the Uniform flow encodes
outside each edge square: how much data an edge latent stands for), max_abs_sample per model,
uniform_samples_inside_box, the squeeze map, figure paths, the config and the wall time.

Measured (seed 0, defaults, `python algorithms/cnf_toy_moons.py --out_dir /tmp/moons`, 1 min 50 s
on 2 CPU cores shared with other jobs): OOD fraction of fresh data 1.2%; Normal flow a = 1, 1.5, 2,
3, 4: 3.9%, 15%, 32%, 58%, 73% (Fig. 3's trend: the decoded points leave the moons and pile up on
the box's edges); Uniform flow, whole box: 3.3% (as the Normal flow at a = 1). Our addition: the
Uniform flow's edge squares d = 0.9, 0.99, 0.999, 1 give 3.5%, 18%, 64%, 98%: the box's interior
decodes onto the data, but latents pressed against its edge reach the flow's extrapolated tails
(d = 0.99 stands for the outer 1.6% of the training data, d = 0.999 for 0.1%, d = 1 for none of it).
The bound makes the latent space finite and its scale fixed, as the paper argues; it does not make
every latent in the closed box in-distribution: a latent policy pressed against the box's edge can
still leave the data. Validation NLL: Normal -0.06, Uniform -0.11 nats per point.

Choices where the paper is silent: K = 8 blocks of hidden width 64 (the toy needs far less than
the 12 x 256 of the locomotion flows); AdamW lr 1e-3, weight decay 1e-4, batch 512, gradient-norm
clip 1.0 (cnf.py: 0.1; not tuned here), `steps` = 2000 steps per model with batches drawn with
replacement (enough for the figures; the run stays within about 2 minutes on 2 loaded cores), ActNorm
initialised from the first batch as in cnf.py; both models start from the same seed. One torch
thread by default (`cpu_threads`): the ops are tiny, and two threads on a busy 2-core machine were
about 8x slower per step.

Reading order: config; the two flows (cnf.py's layers with an empty condition, Eq. 5 without a
state) and their fitting; the experiment: data, the out-of-distribution metric, latent samples,
figures, and `run(config)`.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ALGORITHM = "cnf_toy_moons"


@dataclass
class ToyConfig:
    seed: int = 0  # seeds make_moons, numpy and torch
    steps: int = 2_000  # gradient steps per flow
    out_dir: str = "runs/toy_moons"  # figures and toy_moons.json are written here
    device: str = "cpu"  # torch device (the toy is tiny: the CPU is fine)
    cpu_threads: Optional[int] = 1  # torch CPU threads (tiny ops: one thread is fastest; None = torch's default)
    n_train: int = 4_000  # make_moons training points
    noise: float = 0.05  # make_moons Gaussian noise (before squeezing)
    squeeze: float = 0.95  # per-axis min-max map of the training data onto [-squeeze, squeeze]
    n_blocks: int = 8  # K blocks of ActNorm -> invertible linear -> coupling
    hidden: int = 64  # coupling conditioner width
    batch_size: int = 512  # training batch size
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    n_samples: int = 4_000  # samples per model and latent setting (figures and OOD fractions)
    amplitudes: Tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)  # Fig. 3: latents a * N(0, I)
    edge_depths: Tuple[float, ...] = (0.9, 0.99, 0.999, 1.0)  # uniform latents on the square of half-side d
    ood_quantile: float = 0.99  # OOD threshold: this quantile of the training nearest-neighbour distances
    grid: int = 200  # density image resolution per axis


# %% The flows: cnf.py's layers with an empty condition, and a Normal or a Uniform latent
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


# Copied from cnf.py: ACTION_EPS
ACTION_EPS = 1e-5  # actions and latents are clamped to [-1 + eps, 1 - eps] (official code)


# Copied from cnf.py: ActNorm
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


# Copied from cnf.py: InvertibleLinear
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


# Copied from cnf.py: AffineCoupling
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


# Copied from cnf.py: FlowBlock
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


# Copied from cnf.py: tanh_log_derivative
def tanh_log_derivative(h: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(h)^2), computed without cancellation near |h| large."""
    return 2.0 * (math.log(2.0) - h - F.softplus(-2.0 * h))


class ToyFlow(nn.Module):
    """An unconditional CNF-style flow on 2-D points: data -> latent is atanh -> K x FlowBlock, then
    tanh with base Uniform(-1, 1)^n (`latent="uniform"`, CNF) or nothing with base N(0, I)
    (`latent="normal"`, the paper's "NF"). Blocks see an empty condition [batch, 0]."""

    def __init__(self, dim: int, n_blocks: int, hidden: int, latent: str):
        super().__init__()
        if latent not in ("normal", "uniform"):
            raise ValueError(f"latent must be 'normal' or 'uniform', not {latent!r}")
        self.dim, self.latent = dim, latent
        self.blocks = nn.ModuleList(FlowBlock(dim, 0, hidden, keep_first=i % 2 == 0) for i in range(n_blocks))

    @staticmethod
    def no_condition(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(len(x), 0)

    def encode(self, points: torch.Tensor, initialize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """z = f(x) and log|det df/dx|."""
        x = points.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)
        h, log_det, cond = torch.atanh(x), -torch.log1p(-x * x).sum(-1), self.no_condition(x)
        for block in self.blocks:
            h, block_log_det = block.encode(h, cond, initialize)
            log_det = log_det + block_log_det
        if self.latent == "uniform":
            return torch.tanh(h), log_det + tanh_log_derivative(h).sum(-1)
        return h, log_det

    def log_prob(self, points: torch.Tensor) -> torch.Tensor:
        """Eq. 5 without the state: log p(x) = log p_Z(f(x)) + log|det df/dx|."""
        z, log_det = self.encode(points)
        if self.latent == "uniform":
            return log_det - self.dim * math.log(2.0)
        return log_det - 0.5 * (z * z).sum(-1) - 0.5 * self.dim * math.log(2.0 * math.pi)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x = f^-1(z), clamped to [-1 + eps, 1 - eps]^2 as cnf.py's decode (float32 tanh rounds to 1 past
        |h| ~ 9); uniform latents are clamped into the box first, as cnf.py does."""
        if self.latent == "uniform":
            h = torch.atanh(latents.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS))
        else:
            h = latents
        cond = self.no_condition(latents)
        for block in reversed(self.blocks):
            h = block.decode(h, cond)
        return torch.tanh(h).clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)


def fit_flow(flow: ToyFlow, train: torch.Tensor, valid: torch.Tensor, config: ToyConfig) -> Dict[str, List[float]]:
    """Maximum likelihood with AdamW; returns train (running mean) and valid NLL every 10% of steps."""
    fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel for all parameters
    optimizer = torch.optim.AdamW(flow.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        flow.encode(train[torch.randint(0, len(train), (config.batch_size,))], initialize=True)
    history: Dict[str, List[float]] = {"step": [], "train_nll": [], "valid_nll": []}
    every, running = max(1, config.steps // 10), torch.zeros(())
    for step in range(1, config.steps + 1):
        nll = -flow.log_prob(train[torch.randint(0, len(train), (config.batch_size,), device=train.device)]).mean()
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        nn.utils.clip_grad_norm_(flow.parameters(), config.grad_clip)
        optimizer.step()
        running += nll.detach().cpu()
        if step % every == 0 or step == config.steps:
            with torch.no_grad():
                valid_nll = -flow.log_prob(valid).mean().item()
            count = step - (history["step"][-1] if history["step"] else 0)
            history["step"].append(step)
            history["train_nll"].append(running.item() / count)
            history["valid_nll"].append(valid_nll)
            running.zero_()
    return history


# %% The experiment: data, the out-of-distribution metric, latent samples, figures
def make_moons_squeezed(config: ToyConfig) -> Dict[str, np.ndarray]:
    """Training, validation and reference points in (-1, 1)^2, float32, and the squeeze map."""
    from sklearn.datasets import make_moons

    draw = lambda n, offset: make_moons(n, noise=config.noise, random_state=config.seed + offset)[0]  # noqa: E731
    train = draw(config.n_train, 0)
    low, high = train.min(0), train.max(0)

    def squeeze(x: np.ndarray) -> np.ndarray:
        return (-config.squeeze + 2 * config.squeeze * (x - low) / (high - low)).astype(np.float32)

    return {"train": squeeze(train), "valid": squeeze(draw(config.n_train, 1)),
            "reference": squeeze(draw(config.n_samples, 2)), "low": low, "high": high}


class NearestNeighbourOOD:
    """Out of distribution = farther than `threshold` from every training point (see the docstring)."""

    def __init__(self, train: np.ndarray, quantile: float):
        from sklearn.neighbors import KDTree

        self.tree = KDTree(train)
        nearest_other = self.tree.query(train, k=2)[0][:, 1]  # k=1 is the point itself
        self.threshold = float(np.quantile(nearest_other, quantile))

    def is_ood(self, points: np.ndarray) -> np.ndarray:
        return self.tree.query(points, k=1)[0][:, 0] > self.threshold

    def fraction(self, points: np.ndarray) -> float:
        return float(self.is_ood(points).mean())


def box_edge_latents(n: int, depth: float, generator: torch.Generator) -> torch.Tensor:
    """n points spread uniformly over the boundary of the square [-depth, depth]^2 (its four sides)."""
    along = torch.rand(n, generator=generator) * 2 - 1
    side = torch.randint(0, 4, (n,), generator=generator)
    fixed = torch.where(side % 2 == 0, 1.0, -1.0)
    edge = torch.where((side < 2)[:, None], torch.stack([fixed, along], -1), torch.stack([along, fixed], -1))
    return depth * edge


def plot_figures(models: Dict[str, ToyFlow], data: Dict[str, np.ndarray], samples: Dict[str, Dict[str, np.ndarray]],
                 ood: NearestNeighbourOOD, config: ToyConfig, out_dir: Path) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = data["train"]
    axis = np.linspace(-1, 1, config.grid + 2, dtype=np.float32)[1:-1]
    grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)  # row = y, column = x

    def square(ax, title, limit=1.0):
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)

    # Fig. 2: per model, the density on the box, samples over the data, and the data in latent space.
    fig, axes = plt.subplots(2, 4, figsize=(14, 7))
    for row, (name, flow) in enumerate(models.items()):
        axes[row, 0].scatter(train[:, 0], train[:, 1], s=1, c="k", alpha=0.3)
        square(axes[row, 0], f"training data ({len(train)})")
        with torch.no_grad():
            density = flow.log_prob(torch.from_numpy(grid).to(config.device)).exp().cpu().numpy()
            latents = flow.encode(torch.from_numpy(train).to(config.device))[0].cpu().numpy()
        axes[row, 1].imshow(density.reshape(config.grid, config.grid), origin="lower", extent=(-1, 1, -1, 1),
                            cmap="viridis", vmax=np.quantile(density, 0.995))
        square(axes[row, 1], f"{name} latent: density p(x)")
        key = "1" if name == "normal" else "box"
        points = samples[name][key]
        axes[row, 2].scatter(train[:, 0], train[:, 1], s=1, c="0.8")
        axes[row, 2].scatter(points[:, 0], points[:, 1], s=1, c="tab:blue")
        square(axes[row, 2], f"{name} latent: samples (z ~ {'N(0, I)' if name == 'normal' else 'U(-1, 1)^2'})")
        axes[row, 3].scatter(latents[:, 0], latents[:, 1], s=1, c="tab:green", alpha=0.5)
        if name == "normal":
            for radius in (1, 2, 3):
                axes[row, 3].add_patch(plt.Circle((0, 0), radius, fill=False, ls="--", lw=0.8))
            square(axes[row, 3], "training data in latent space (circles: 1, 2, 3 sigma)", limit=4.5)
        else:
            axes[row, 3].add_patch(plt.Rectangle((-1, -1), 2, 2, fill=False, ls="--", lw=0.8))
            square(axes[row, 3], "training data in latent space (box (-1, 1)^2)", limit=1.1)
    fig.tight_layout()
    fig2 = out_dir / "fig2_densities_samples.png"
    fig.savefig(fig2, dpi=100)
    plt.close(fig)

    # Fig. 3: Normal latent pushed by amplitude a, then the Uniform latent's whole box and its edges.
    panels = [("normal", f"{a:g}", f"normal: z ~ {a:g} N(0, I)") for a in config.amplitudes]
    panels += [("uniform", "box", "uniform: z ~ U(-1, 1)^2")]
    panels += [("uniform", f"edge_{d:g}", f"uniform: z on the square max|z_i| = {d:g}") for d in config.edge_depths]
    columns = max(len(config.amplitudes), 1 + len(config.edge_depths))
    fig, axes = plt.subplots(2, columns, figsize=(3 * columns, 6.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    slots = ([axes[0, i] for i in range(len(config.amplitudes))]
             + [axes[1, i] for i in range(1 + len(config.edge_depths))])
    for ax, (name, key, title) in zip(slots, panels):
        ax.axis("on")
        points = samples[name][key]
        out = ood.is_ood(points)
        ax.scatter(train[:, 0], train[:, 1], s=1, c="0.8")
        ax.scatter(points[~out, 0], points[~out, 1], s=1, c="tab:blue")
        ax.scatter(points[out, 0], points[out, 1], s=1, c="tab:red")
        square(ax, f"{title}\nOOD (red): {out.mean():.1%}")
    fig.tight_layout()
    fig3 = out_dir / "fig3_ood_amplitudes.png"
    fig.savefig(fig3, dpi=100)
    plt.close(fig)
    return {"fig2": str(fig2), "fig3": str(fig3)}


# %% The run
def run(config: ToyConfig) -> Path:
    """Fit both flows, sample, measure OOD fractions, plot; returns the JSON path."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; pass --device cpu")
    if not 0.0 < config.squeeze < 1.0:
        raise SystemExit(f"error: --squeeze must lie in (0, 1), got {config.squeeze}")
    if min(config.steps, config.n_train, config.n_samples, config.batch_size) < 1 or config.n_train < 2:
        raise SystemExit("error: --steps, --n_train (>= 2), --n_samples and --batch_size must be positive")
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    started = time.time()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.random.seed(config.seed)
    data = make_moons_squeezed(config)
    ood = NearestNeighbourOOD(data["train"], config.ood_quantile)
    train = torch.from_numpy(data["train"]).to(config.device)
    valid = torch.from_numpy(data["valid"]).to(config.device)

    models, histories, samples = {}, {}, {}
    for name in ("normal", "uniform"):
        torch.manual_seed(config.seed)
        models[name] = ToyFlow(2, config.n_blocks, config.hidden, latent=name).to(config.device)
        histories[name] = fit_flow(models[name], train, valid, config)
        models[name].eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    noise = torch.randn(config.n_samples, 2, generator=generator)  # the same eps for every amplitude
    with torch.no_grad():
        decode = lambda name, z: models[name].decode(z.to(config.device)).cpu().numpy()  # noqa: E731
        samples["normal"] = {f"{a:g}": decode("normal", a * noise) for a in config.amplitudes}
        samples["uniform"] = {"box": decode("uniform", torch.rand(config.n_samples, 2, generator=generator) * 2 - 1)}
        for depth in config.edge_depths:
            edge = box_edge_latents(config.n_samples, depth, generator)
            samples["uniform"][f"edge_{depth:g}"] = decode("uniform", edge)
        latents_uniform = models["uniform"].encode(train)[0].cpu()  # [n_train, 2]
    figures = plot_figures(models, data, samples, ood, config, out_dir)

    results = {
        "algorithm": ALGORITHM,
        "ood_metric": f"distance to the nearest training point > the {config.ood_quantile:g} quantile of the "
                      f"training points' nearest-neighbour distances (squeezed coordinates)",
        "ood_threshold": ood.threshold,
        "ood_fraction": {
            "normal": {key: ood.fraction(points) for key, points in samples["normal"].items()},
            "uniform": {key: ood.fraction(points) for key, points in samples["uniform"].items()},
            "reference_fresh_moons": ood.fraction(data["reference"]),
        },
        "nll": {name: {"train": h["train_nll"][-1], "valid": h["valid_nll"][-1]} for name, h in histories.items()},
        "nll_history": histories,
        # how much of the training data the uniform model encodes beyond each edge square
        "uniform_training_latents_beyond_edge": {f"edge_{d:g}": float((latents_uniform.abs().max(-1).values > d)
                                                                      .float().mean()) for d in config.edge_depths},
        "max_abs_sample": {name: float(max(np.abs(p).max() for p in s.values())) for name, s in samples.items()},
        "uniform_samples_inside_box": bool(all((np.abs(p) < 1.0).all() for p in samples["uniform"].values())),
        "squeeze": {"map": f"per-axis min-max of the training points onto [-{config.squeeze:g}, {config.squeeze:g}]",
                    "data_min": data["low"].tolist(), "data_max": data["high"].tolist()},
        "figures": figures,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "wall_time_s": time.time() - started,
    }
    path = out_dir / "toy_moons.json"
    tmp = out_dir / ".toy_moons.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    return path


def parse_config(argv: List[str]) -> ToyConfig:
    import tyro

    return tyro.cli(ToyConfig, args=argv, use_underscores=True)


if __name__ == "__main__":
    path = run(parse_config(sys.argv[1:]))
    print(f"results: {path}")
