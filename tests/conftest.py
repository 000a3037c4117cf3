"""Shared test helpers: tiny D4RL-format HDF5 files written by the tests themselves."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "algorithms"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny models: one thread each is fastest, and it keeps subprocess runs from oversubscribing the cores
# (OpenMP threads spinning against each other slow small workloads down by 10x or more).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


def write_tiny_hdf5(path, n=2000, episode=200, obs_dim=11, act_dim=3, env="Hopper-v5", seed=0, attrs=True):
    """Random D4RL-layout data: episodes of `episode` steps ending in a timeout; one early terminal."""
    rng = np.random.default_rng(seed)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[episode - 1::episode] = True
    terminals = np.zeros(n, dtype=bool)
    terminals[episode // 2] = True  # an episode that ends by termination
    timeouts[episode // 2] = False
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-0.95, 0.95, size=(n, act_dim)).astype(np.float32)
        f["rewards"] = rng.normal(1.0, 0.3, size=n).astype(np.float32)
        f["terminals"] = terminals
        f["timeouts"] = timeouts
        if attrs:
            f.attrs["env"] = env
            f.attrs["ref_min_score"] = -20.272305
            f.attrs["ref_max_score"] = 3234.3
    return str(path)


@pytest.fixture
def tiny_hdf5(tmp_path):
    return write_tiny_hdf5(tmp_path / "tiny.hdf5")


def run_algorithm(name, *args, timeout=600):
    """Run algorithms/<name>.py in a subprocess on the CPU, one thread, wandb off."""
    cmd = [sys.executable, str(ROOT / "algorithms" / f"{name}.py"), "--device", "cpu", "--cpu_threads", "1",
           "--wandb_mode", "disabled", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def interrupted_then_resumed(module, trainer_class, config, monkeypatch, stop_after=30):
    """Run `config` as run "stopped" until update `stop_after + 1` raises (a kill), check that the last
    checkpoint is the last evaluation before it, then `--resume` the run; return its results.json."""
    calls, original = {"n": 0}, trainer_class.train

    def stop(self, batch):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(trainer_class, "train", stop)
    with pytest.raises(KeyboardInterrupt):
        module.train(replace(config, run_name="stopped"))
    run_dir = Path(config.checkpoints_path) / "stopped"
    saved_step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert saved_step == stop_after // config.eval_every * config.eval_every
    monkeypatch.setattr(trainer_class, "train", original)
    return json.loads(module.train(replace(config, resume=str(run_dir))).read_text())


def random_flow(flow_class, action_dim, state_dim=4, n_blocks=3, hidden=16, seed=0, dtype=torch.float64):
    """A flow that is *not* the identity: couplings' last layers random (|log-scale| <= 0.2 per
    block, as the rescale r bounds it), PReLU slopes random (not all the initial 0.25), ActNorm
    initialised on actions that fill the box."""
    torch.manual_seed(seed)
    flow = flow_class(action_dim, state_dim, n_blocks, hidden).to(dtype)
    with torch.no_grad():
        for block in flow.blocks:
            block.coupling.conditioner[-1].weight.normal_(0.0, 0.3)
            block.coupling.conditioner[-1].bias.normal_(0.0, 0.3)
            block.coupling.rescale.fill_(0.2)
            for layer in block.coupling.conditioner:
                if isinstance(layer, torch.nn.PReLU):
                    layer.weight.uniform_(0.0, 0.6)
        actions = torch.rand(256, action_dim, dtype=dtype) * 1.9 - 0.95
        flow.encode(actions, torch.randn(256, state_dim, dtype=dtype), initialize=True)
    return flow


def toy_conditional_data(n, seed=0):
    """a | s: centred at (tanh(s0), -tanh(s1)) * 0.7 with state-dependent spread, inside (-1, 1)^2."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, 3, generator=g)
    centre = torch.stack([torch.tanh(states[:, 0]), -torch.tanh(states[:, 1])], -1) * 0.7
    actions = (centre + 0.05 * torch.randn(n, 2, generator=g) * (1 + states[:, 2:3].abs())).clamp(-0.99, 0.99)
    return actions, states


def tiny_flow_config(config_class, **overrides):
    """A TrainConfig of a flow-based script (cnf.py and its ablations) with tiny networks and budgets."""
    fields = dict(device="cpu", flow_layers=2, flow_hidden=32, flow_batch_size=256, flow_lr=3e-3,
                  flow_steps=200, flow_eval_every=50, hidden_dim=32, n_layers=3, batch_size=64)
    fields.update(overrides)
    return config_class(**fields)


# Flags for a seconds-long end-to-end run of a flow-based script (cnf.py and its flow ablations).
TINY_FLOW_RUN_FLAGS = ["--train_steps", "40", "--eval_every", "20", "--eval_episodes", "2", "--batch_size", "32",
                       "--flow_steps", "20", "--flow_eval_every", "10", "--flow_layers", "2", "--flow_hidden", "32",
                       "--hidden_dim", "32", "--n_layers", "3"]


def script_critic(agent, score):
    """Make the agent's twin critic a fixed function: both heads return `score(action) -> [N, 1]`,
    and critic updates change nothing (frozen parameters, optimiser step a no-op)."""
    for p in agent.critic.parameters():
        p.requires_grad_(False)
    agent.critic_optimizer.step = lambda: None
    agent.critic.forward = lambda s, a: score(a).expand(2, -1, -1).clone().requires_grad_()


def frozen(flow):
    """Phase 2's frozen flow: `FrozenFlow(flow)` of the flow's own script."""
    return sys.modules[type(flow).__module__].FrozenFlow(flow)


def assert_frozen_decode_matches_unfrozen(flow, latents, states):
    """FrozenFlow's fast decoder gives the unfrozen decode and its gradient to the latents, and none to the flow."""
    latents.requires_grad_(True)
    before = flow.decode(latents, states)
    (grad_before,) = torch.autograd.grad(before.sum(), latents)
    actions = frozen(flow).decode(latents, states)
    actions.sum().backward()
    assert torch.allclose(actions, before.detach(), atol=1e-5)
    assert torch.allclose(latents.grad, grad_before, atol=1e-4)
    assert latents.grad is not None and all(p.grad is None and not p.requires_grad for p in flow.parameters())


def assert_pretraining_decreases_validation_nll(flow, trainer_class, config):
    """300 phase-1 steps on toy conditional data lower the held-out NLL by more than one nat."""
    torch.manual_seed(0)
    actions, states = toy_conditional_data(4000)
    flow.encode(actions[:256], states[:256], initialize=True)
    trainer = trainer_class(flow, config)
    before = trainer.validation_nll(actions[3000:], states[3000:])
    for _ in range(300):
        idx = torch.randint(0, 3000, (256,))
        trainer.train(actions[idx], states[idx])
    after = trainer.validation_nll(actions[3000:], states[3000:])
    assert after < before - 1.0, (before, after)


def density_integral(flow, state, points_per_axis):
    """Trapezoid integral of the flow's density p(a | state) over the open action box (-1, 1)^n, n = 1 or 2,
    on a grid of `points_per_axis` points per axis (the two box edges left out)."""
    axis = torch.linspace(-1, 1, points_per_axis, dtype=torch.float64)[1:-1]
    grid = torch.cartesian_prod(*[axis] * flow.action_dim).reshape(-1, flow.action_dim)
    with torch.no_grad():
        density = flow.log_prob(grid, state.reshape(1, -1).expand(len(grid), -1)).exp()
    if flow.action_dim == 1:
        return torch.trapezoid(density, axis).item()
    return torch.trapezoid(torch.trapezoid(density.reshape(len(axis), len(axis)), axis, dim=1), axis).item()
