"""`--compile`: the update through torch.compile computes what the eager update computes.

Inductor draws random numbers with its own generator, so for the comparison it is told to use eager's
(`fallback_random`); the maths is then the same up to float rounding. One end-to-end run with --compile and a
resume covers the loop (compiled artefacts are cached, so the resumed process compiles quickly)."""
import json

import pytest
import torch

import cnf
from conftest import TINY_FLOW_RUN_FLAGS, random_flow, run_algorithm, tiny_flow_config


def tiny_agent(compile: bool):
    torch.manual_seed(0)
    flow = random_flow(cnf.ConditionalFlow, 3, state_dim=5, n_blocks=2, hidden=16, dtype=torch.float32)
    config = tiny_flow_config(cnf.TrainConfig, compile=compile, hidden_dim=32, n_layers=3)
    return cnf.CNF(flow, 5, 3, config), config


def test_compiled_update_matches_the_eager_one(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(64, 5, generator=g), torch.rand(64, 3, generator=g) * 1.8 - 0.9,
             torch.randn(64, 1, generator=g), torch.randn(64, 5, generator=g), torch.zeros(64, 1))
    results = {}
    for mode in (False, True):
        agent, config = tiny_agent(mode)
        update = cnf.compiled(lambda: agent.train(batch), config)
        torch.manual_seed(2)
        losses = [{k: float(v) for k, v in update().items()} for _ in range(3)]
        results[mode] = losses, [p.detach().clone() for p in agent.actor.parameters()]
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results[False], results[True]
    for eager, compiled in zip(eager_losses, compiled_losses):
        assert eager.keys() == compiled.keys()
        for key in eager:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), key
    for e, c in zip(eager_params, compiled_params):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(eager_params, tiny_agent(False)[0].actor.parameters()))


@pytest.mark.parametrize("slope", [-0.5, 0.0, 0.25, 1.0, 1.5])
def test_frozen_leaky_relu_under_compile_is_the_eager_one(slope):
    """The frozen decoder's activation is written as max(x, slope x) (or min) under torch.compile: the same values
    and gradients as F.leaky_relu for any slope (away from x = 0, where neither is differentiable)."""
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0)) * 3.0
    grad = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for activation in (cnf.FrozenFlow.leaky_relu, torch.compile(cnf.FrozenFlow.leaky_relu)):
        inputs = x.clone().requires_grad_(True)
        out = activation(inputs, slope)
        out.backward(grad)
        results.append((out.detach(), inputs.grad))
    (eager_out, eager_grad), (compiled_out, compiled_grad) = results
    torch.testing.assert_close(eager_out, torch.nn.functional.leaky_relu(x, slope))
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_a_compiled_run_ends_and_resumes(tmp_path, tiny_hdf5):
    flags = ["--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "r", "--compile",
             *TINY_FLOW_RUN_FLAGS]
    first = run_algorithm("cnf", *flags, timeout=1200)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_algorithm("cnf", "--resume", str(tmp_path / "r"), "--train_steps", "60", timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [e["step"] for e in results["evaluations"]] == [20, 40, 60]
    assert all(e["normalized_score"] == e["normalized_score"] for e in results["evaluations"])  # not NaN


def test_iql_compiled_update_does_not_recompile_as_its_lr_anneals():
    """IQL's actor lr changes at every update (cosine schedule): held as a tensor under --compile, the schedule
    changes a value inside the compiled update; as a Python float it would recompile the update at every step."""
    import iql
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = iql.TrainConfig(device="cpu", compile=True, hidden_dim=32, n_layers=2, train_steps=100)
    agent = iql.IQL(5, 3, config)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(64, 5, generator=g), torch.rand(64, 3, generator=g) * 1.8 - 0.9,
             torch.randn(64, 1, generator=g), torch.randn(64, 5, generator=g), torch.zeros(64, 1))
    update = iql.compiled(lambda: agent.train(batch), config)
    graphs, lrs = [], []
    for _ in range(5):
        lrs.append(float(update()["actor_lr"]))
        graphs.append(counters["stats"]["unique_graphs"])
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # the schedule does anneal
    assert graphs[1:] == [graphs[0]] * 4, graphs  # compiled once, then replayed
