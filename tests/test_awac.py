"""algorithms/awac.py: advantage weights, the actor and critic updates, the run loop."""
import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import awac
from conftest import ROOT, interrupted_then_resumed, run_algorithm, script_critic


def tiny_config(**overrides):
    fields = dict(device="cpu", hidden_dim=32, n_layers=3, batch_size=64)
    fields.update(overrides)
    return awac.TrainConfig(**fields)


@pytest.mark.parametrize("awac_lambda, want", [
    # A = (-1, 0, 0.5, 2, 10): exp(A / lambda), clamped at 100
    (1.0, [math.exp(-1.0), 1.0, math.exp(0.5), math.exp(2.0), 100.0]),  # exp(10) = 22026 -> 100
    (1.0 / 3.0, [math.exp(-3.0), 1.0, math.exp(1.5), 100.0, 100.0]),  # exp(6) = 403 -> 100
])
def test_advantage_weights_are_clamped_exponentials(awac_lambda, want):
    advantages = torch.tensor([-1.0, 0.0, 0.5, 2.0, 10.0])
    got = awac.advantage_weights(advantages, awac_lambda, 100.0)
    assert torch.allclose(got, torch.tensor(want), rtol=1e-5)
    assert awac.advantage_weights(torch.tensor([1e4]), awac_lambda, 100.0).item() == 100.0  # exp overflow -> clamp


def test_actor_loss_is_the_weighted_log_likelihood_with_the_updated_critics():
    """Recompute one update's actor loss by hand: critics after their step, min(Q1, Q2), a policy
    sample drawn from the same random stream, weights clamp(exp(A / lambda), 100), -mean(w log pi(a|s))."""
    torch.manual_seed(0)
    agent = awac.AWAC(4, 3, tiny_config(awac_lambda=0.02))
    with torch.no_grad():  # a wide policy, so that advantages spread and some weights hit the clamp
        agent.actor.log_std.fill_(-0.5)
    states, actions = torch.randn(256, 4), torch.rand(256, 3) * 1.8 - 0.9
    batch = (states, actions, torch.randn(256, 1), torch.randn(256, 4), torch.zeros(256, 1))
    actor_before = {k: v.clone() for k, v in agent.actor.state_dict().items()}
    torch.manual_seed(1)
    metrics = agent.train(batch)
    # by hand, with the critics as they are now (after the update's critic step)
    policy = awac.GaussianPolicy(4, 3, 32, 3, -20.0, 2.0, tanh_mean=False)
    policy.load_state_dict(actor_before)
    torch.manual_seed(1)
    torch.randn(256, 3)  # the critic target's sample a' ~ pi(. | s')
    noise = torch.randn(256, 3)
    with torch.no_grad():
        mean, std = policy.net(states), policy.log_std.exp()
        sampled = (mean + std * noise).clamp(-1, 1)
        q = lambda a: agent.critic(states, a).min(0).values  # noqa: E731
        weights = torch.exp((q(actions) - q(sampled)) / 0.02).clamp(max=100.0)
        log_prob = torch.distributions.Normal(mean, std).log_prob(actions).sum(-1, keepdim=True)
    assert 0 < (weights == 100.0).sum() < 256  # both the clamped and the unclamped branch occur
    assert metrics["adv_weight_mean"].item() == pytest.approx(weights.mean().item(), rel=1e-5)
    assert metrics["actor_loss"].item() == pytest.approx(-(weights * log_prob).mean().item(), rel=1e-5)


def test_critics_learn_a_known_value():
    """Every transition terminal with reward 1: both critics must approach Q = 1."""
    torch.manual_seed(0)
    agent = awac.AWAC(4, 3, tiny_config(critic_lr=3e-3))
    states, actions = torch.randn(128, 4), torch.rand(128, 3) * 1.8 - 0.9
    batch = (states, actions, torch.ones(128, 1), torch.randn(128, 4), torch.ones(128, 1))
    first = agent.train(batch)["critic_loss"].item()
    for _ in range(300):
        last = agent.train(batch)
    assert last["critic_loss"].item() < 0.05 * first
    assert (agent.critic(states, actions) - 1.0).abs().mean(dim=(1, 2)).max() < 0.05


def test_critic_target_bootstraps_from_the_target_critics():
    """Non-terminal, reward 0, target critics scripted to min(Q1', Q2') = 0.5 at every next action:
    the critics must approach gamma * 0.5, the target critics having been scripted, not learned."""
    torch.manual_seed(0)
    agent = awac.AWAC(4, 3, tiny_config(critic_lr=1e-3))
    agent.target_critic.forward = lambda s, a: torch.stack([torch.full((len(s), 1), 0.5), torch.full((len(s), 1), 2.0)])
    states, actions = torch.randn(256, 4), torch.rand(256, 3) * 1.8 - 0.9
    batch = (states, actions, torch.zeros(256, 1), torch.randn(256, 4), torch.zeros(256, 1))
    for _ in range(300):
        agent.train(batch)
    assert (agent.critic(states, actions) - 0.99 * 0.5).abs().mean() < 0.03


def test_policy_moves_toward_high_advantage_actions():
    """Every state appears twice, with a good and a bad action under a fixed critic: behaviour cloning
    would end halfway between them (about 0.75 of the initial error); exp(A / lambda) must pick the good one."""
    torch.manual_seed(0)
    agent = awac.AWAC(4, 2, tiny_config(actor_lr=3e-3, awac_lambda=1.0 / 3.0))
    target, decoy = torch.tensor([0.6, -0.4]), torch.tensor([-0.6, 0.4])
    script_critic(agent, lambda a: -((a - target) ** 2).sum(-1, keepdim=True))
    states = torch.randn(64, 4).repeat(2, 1)
    actions = torch.cat([target.expand(64, 2), decoy.expand(64, 2)])
    batch = (states, actions, torch.zeros(128, 1), states, torch.ones(128, 1))
    before = (agent.act(states) - target).abs().mean()
    for _ in range(300):
        agent.train(batch)
    after = (agent.act(states) - target).abs().mean()
    assert after < 0.2 * before, (before, after)


def test_policy_log_density_samples_and_actions():
    torch.manual_seed(0)
    policy = awac.GaussianPolicy(4, 3, 16, 3, -20.0, 2.0, tanh_mean=False)  # CORL's AWAC: unsquashed mean
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-1.0, 0.0, 5.0]))  # 5 is clamped to 2
        policy.net[-1].bias.copy_(torch.tensor([3.0, 0.0, -3.0]))  # means outside the box
    states, actions = torch.randn(512, 4), torch.rand(512, 3) * 2 - 1
    want = torch.distributions.Normal(policy.net(states), torch.tensor([-1.0, 0.0, 2.0]).exp()).log_prob(actions)
    assert torch.allclose(policy.log_prob(states, actions), want.sum(-1, keepdim=True), atol=1e-5)
    samples = policy.sample(states)
    assert samples.abs().max() <= 1.0 and (samples[:, 0] == 1.0).float().mean() > 0.9  # clamped to the box
    assert (policy.deterministic(states)[:, 0] == 1.0).all() and (policy.deterministic(states)[:, 2] == -1.0).all()


def test_amp_runs_the_hidden_layers_in_bfloat16_and_returns_float32():
    torch.manual_seed(0)
    agent = awac.AWAC(4, 3, tiny_config(amp=True))
    states, actions = torch.randn(64, 4), torch.rand(64, 3) * 1.8 - 0.9
    metrics = agent.train((states, actions, torch.randn(64, 1), torch.randn(64, 4), torch.zeros(64, 1)))
    assert all(torch.isfinite(v).all() for v in metrics.values())
    float32_actor = copy.deepcopy(agent.actor)
    float32_actor.amp = False
    with torch.no_grad():
        mean, exact = agent.actor.mean(states), float32_actor.mean(states)
        assert mean.dtype == torch.float32 and agent.critic(states, actions).dtype == torch.float32
    assert 0 < (mean - exact).abs().max() < 0.05  # bfloat16 rounding, nothing more


@pytest.mark.parametrize("family, fields", [
    ("locomotion", {"awac_lambda": 0.3333, "n_layers": 4, "reward_scaling": "none"}),
    ("maze2d", {"awac_lambda": 0.1, "reward_scaling": "none", "eval_episodes": 100}),
    ("antmaze", {"awac_lambda": 0.1, "reward_scaling": "antmaze", "eval_episodes": 100}),
    ("quick", {"env": "halfcheetah-medium-gymv5", "device": "cpu", "cpu_threads": 1}),
])
def test_yaml_presets_load_and_flags_override_them(family, fields):
    path = ROOT / "algorithms" / "configs" / "awac" / f"{family}.yaml"
    config = awac.parse_config(awac.TrainConfig, ["--config_path", str(path), "--seed", "7"])
    assert {k: getattr(config, k) for k in fields} == fields and config.seed == 7


def run_script(*args, timeout=600):
    return run_algorithm("awac", *args, timeout=timeout)


def test_end_to_end_run_writes_what_it_promises(tmp_path, tiny_hdf5):
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "run",
                      "--train_steps", "40", "--eval_every", "20", "--eval_episodes", "2", "--batch_size", "32",
                      "--hidden_dim", "32", "--awac_lambda", "0.25")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert proc.stdout.strip().splitlines()[-1] == f"results: {run / 'results.json'}"
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "awac"
    assert [e["step"] for e in results["evaluations"]] == [20, 40]
    assert results["final_normalized_score"] == results["evaluations"][-1]["normalized_score"]
    assert (results["reward_scaling"], results["reward_scale"], results["reward_shift"]) == ("none", 1.0, 0.0)
    assert "awac_lambda: 0.25" in (run / "config.yaml").read_text()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (checkpoint["phase"], checkpoint["step"]) == ("rl", 40)
    assert set(checkpoint["agent"]) >= {"actor", "critic", "target_critic"}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert np.isfinite([json.loads(line).get("critic_loss", 0.0) for line in lines]).all()


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         train_steps=60, eval_every=20, eval_episodes=1)
    full = json.loads(awac.train(replace(config, run_name="full")).read_text())
    full_agent = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["agent"]

    resumed = interrupted_then_resumed(awac, awac.AWAC, config, monkeypatch)
    assert [e["step"] for e in resumed["evaluations"]] == [20, 40, 60]
    assert resumed["evaluations"] == full["evaluations"]
    resumed_agent = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["agent"]
    for net in ("actor", "critic", "target_critic"):
        assert all(torch.equal(full_agent[net][k], resumed_agent[net][k]) for k in full_agent[net])
