"""algorithms/iql.py: expectile value loss, critics, policy extraction, reward scaling, the run loop."""
import copy
import json
import math
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

import iql
from conftest import ROOT, interrupted_then_resumed, run_algorithm


def tiny_config(**overrides):
    fields = dict(device="cpu", hidden_dim=32, n_layers=3, batch_size=64)
    fields.update(overrides)
    return iql.TrainConfig(**fields)


@pytest.mark.parametrize("expectile, want", [
    # residuals u = (-2, -0.5, 0.5, 3): weight 1 - tau below zero, tau above, loss = mean(weight * u^2)
    (0.7, (0.3 * 4 + 0.3 * 0.25 + 0.7 * 0.25 + 0.7 * 9) / 4),  # 1.9375
    (0.9, (0.1 * 4 + 0.1 * 0.25 + 0.9 * 0.25 + 0.9 * 9) / 4),  # 2.1875
    (0.5, 0.5 * (4 + 0.25 + 0.25 + 9) / 4),  # symmetric: half the MSE
])
def test_expectile_loss_is_the_asymmetric_l2_of_hand_computation(expectile, want):
    residuals = torch.tensor([-2.0, -0.5, 0.5, 3.0])
    assert iql.expectile_loss(residuals, expectile).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("expectile", [0.7, 0.9])
def test_value_step_minimises_the_expectile_loss_with_the_configured_tau(expectile):
    torch.manual_seed(0)
    agent = iql.IQL(4, 3, tiny_config(expectile=expectile))
    states, actions = torch.randn(64, 4), torch.rand(64, 3) * 1.8 - 0.9
    with torch.no_grad():
        def residuals():
            return (agent.target_critic(states, actions).min(0).values - agent.value(states))[:, 0]
        agent.value.net[-1].bias += residuals().median()  # centre V: residuals of both signs
        u = residuals().numpy()
    assert (u > 0).any() and (u < 0).any()  # both branches of the asymmetric loss are exercised
    by_hand = lambda tau: float(np.mean(np.where(u < 0, 1 - tau, tau) * u ** 2))  # noqa: E731
    metrics = agent.train((states, actions, torch.zeros(64, 1), torch.randn(64, 4), torch.zeros(64, 1)))
    assert metrics["value_loss"].item() == pytest.approx(by_hand(expectile), rel=1e-5)
    assert metrics["value_loss"].item() != pytest.approx(by_hand(0.5), rel=1e-3)


@pytest.mark.parametrize("expectile", [0.7, 0.9])
def test_value_converges_to_the_expectile_of_the_target_q(expectile):
    """Q'(s, a) is 1 for half of the dataset actions and 0 for the other half: the tau-expectile is tau."""
    torch.manual_seed(0)
    agent = iql.IQL(4, 2, tiny_config(expectile=expectile, value_lr=3e-3))
    agent.target_critic.forward = lambda s, a: (a[:, :1] > 0).float().expand(2, -1, -1)
    states = torch.zeros(32, 4)
    actions = torch.cat([torch.full((16, 2), 0.5), torch.full((16, 2), -0.5)])
    batch = (states, actions, torch.zeros(32, 1), states, torch.ones(32, 1))
    for _ in range(400):
        agent.train(batch)
    assert agent.value(states[:1]).item() == pytest.approx(expectile, abs=0.03)


@pytest.mark.parametrize("done, want", [(1.0, 1.0), (0.0, 1.0 + 0.5 * 2.0)])
def test_critics_learn_a_known_value(done, want):
    """Reward 1, gamma 0.5, V(s') scripted to 2: Q = 1 at terminal transitions, 1 + gamma * 2 otherwise."""
    torch.manual_seed(0)
    agent = iql.IQL(4, 3, tiny_config(critic_lr=3e-3, gamma=0.5))
    agent.value.forward = lambda s: torch.full((len(s), 1), 2.0, requires_grad=True)
    states, actions = torch.randn(128, 4), torch.rand(128, 3) * 1.8 - 0.9
    batch = (states, actions, torch.ones(128, 1), torch.randn(128, 4), torch.full((128, 1), done))
    first = agent.train(batch)["critic_loss"].item()
    for _ in range(300):
        last = agent.train(batch)
    assert last["critic_loss"].item() < 0.05 * first
    q = agent.critic(states, actions)  # [2, B, 1]: both critics
    assert (q - want).abs().mean(dim=(1, 2)).max() < 0.05 * want


def two_action_batch():
    """Every state appears twice, once with a good action (Q' = 0) and once with a bad one (Q' = -2.08)."""
    target, decoy = torch.tensor([0.6, -0.4]), torch.tensor([-0.6, 0.4])
    states = torch.randn(64, 4, generator=torch.Generator().manual_seed(5)).repeat(2, 1)
    actions = torch.cat([target.expand(64, 2), decoy.expand(64, 2)])
    return target, states, (states, actions, torch.zeros(128, 1), states, torch.ones(128, 1))


@pytest.mark.parametrize("deterministic", [False, True])
def test_policy_moves_toward_high_advantage_actions(deterministic):
    """Behaviour cloning would end halfway between the two actions (about 0.75 of the initial error);
    advantage weighting exp(3 A) must pick the good one."""
    torch.manual_seed(0)
    agent = iql.IQL(4, 2, tiny_config(actor_lr=3e-3, value_lr=3e-3, deterministic_policy=deterministic))
    target, states, batch = two_action_batch()
    agent.target_critic.forward = lambda s, a: -((a - target) ** 2).sum(-1, keepdim=True).expand(2, -1, -1)
    before = (agent.act(states) - target).abs().mean()
    for _ in range(300):
        agent.train(batch)
    assert agent.value(states).mean().item() == pytest.approx(0.3 * -2.08, abs=0.03)  # the 0.7-expectile
    after = (agent.act(states) - target).abs().mean()
    assert after < 0.2 * before, (before, after)


def test_advantage_weights_are_clamped_exponentials():
    advantages = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0])
    want = [math.exp(-3.0), 1.0, math.exp(1.5), math.exp(3.0), 100.0]  # beta 3: exp(9) = 8103 -> 100
    assert torch.allclose(iql.advantage_weights(advantages, 3.0, 100.0), torch.tensor(want))


def test_actor_learning_rate_follows_a_cosine_schedule_to_zero():
    agent = iql.IQL(4, 3, tiny_config(actor_lr=1e-3, train_steps=10))
    batch = (torch.randn(8, 4), torch.rand(8, 3) - 0.5, torch.zeros(8, 1), torch.randn(8, 4), torch.zeros(8, 1))
    lrs, logged = [], []
    for _ in range(10):
        logged.append(agent.train(batch)["actor_lr"].item())  # the learning rate of the next update, logged
        lrs.append(agent.actor_optimizer.param_groups[0]["lr"])
    want = [1e-3 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(1, 11)]
    assert lrs == pytest.approx(want, abs=1e-9) and logged == lrs
    assert agent.critic_optimizer.param_groups[0]["lr"] == 3e-4  # only the actor is annealed


@pytest.mark.parametrize("deterministic", [False, True])
def test_amp_runs_the_hidden_layers_in_bfloat16_and_returns_float32(deterministic):
    torch.manual_seed(0)
    agent = iql.IQL(4, 3, tiny_config(amp=True, deterministic_policy=deterministic))
    states, actions = torch.randn(64, 4), torch.rand(64, 3) * 1.8 - 0.9
    metrics = agent.train((states, actions, torch.randn(64, 1), torch.randn(64, 4), torch.zeros(64, 1)))
    assert all(torch.isfinite(v).all() for v in metrics.values())
    float32_actor, float32_value = copy.deepcopy(agent.actor), copy.deepcopy(agent.value)
    float32_actor.amp = float32_value.amp = False
    with torch.no_grad():
        for amp_out, exact in [(agent.act(states), float32_actor.deterministic(states)),
                               (agent.value(states), float32_value(states))]:
            assert amp_out.dtype == torch.float32
            assert 0 < (amp_out - exact).abs().max() < 0.05  # bfloat16 rounding, nothing more
        assert agent.critic(states, actions).dtype == torch.float32


def test_gaussian_log_density_matches_torch_distributions():
    mean, log_std, actions = torch.randn(16, 3), torch.randn(3), torch.randn(16, 3)
    want = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1, keepdim=True)
    assert torch.allclose(iql.normal_log_prob(actions, mean, log_std), want, atol=1e-5)


def toy_data(name="hopper-medium-v2"):
    """Episode A: rows 0-2, ends by termination; B: rows 3-5, ends by a timeout; C: rows 6-7, cut by the file end."""
    raw = {"observations": np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32),
           "actions": np.zeros((8, 1), np.float32), "rewards": np.arange(8, dtype=np.float32),
           "terminals": np.array([0, 0, 1, 0, 0, 0, 0, 0], bool), "timeouts": np.array([0, 0, 0, 0, 0, 1, 0, 0], bool)}
    return iql.OfflineData(name=name, make_eval_env=None, normalize_score=None, **iql.qlearning_dataset(raw))


def test_episode_returns_follow_the_files_episode_boundaries():
    # kept rows 0, 1, 2 | 3, 4 | 6 (the timeout row 5 and the last row 7 are dropped by the conversion)
    np.testing.assert_array_equal(iql.converted_episode_returns(toy_data()), [0 + 1 + 2, 3 + 4, 6])


@pytest.mark.parametrize("name, scaling, scale, shift", [
    ("hopper-medium-v2", "auto", 1000.0 / (7 - 3), 0.0),
    ("halfcheetah_medium-v2", "auto", 1000.0 / (7 - 3), 0.0),
    ("tiny", "returns", 1000.0 / (7 - 3), 0.0),
    ("antmaze-umaze-v2", "auto", 1.0, -1.0),
    ("hopper-medium-v2", "antmaze", 1.0, -1.0),
    ("maze2d-umaze-v1", "auto", 1.0, 0.0),
    ("hopper-medium-v2", "none", 1.0, 0.0),
])
def test_reward_scaling(name, scaling, scale, shift):
    data = toy_data(name)
    scaled, info = iql.scale_rewards(data, scaling)
    np.testing.assert_allclose(scaled.rewards, scale * data.rewards + shift, rtol=1e-6)
    assert (info["reward_scale"], info["reward_shift"]) == pytest.approx((scale, shift))
    with pytest.raises(SystemExit, match="^error: --reward_scaling must be one of"):
        iql.scale_rewards(data, "bogus")


@pytest.mark.parametrize("family, fields", [
    ("locomotion", {"expectile": 0.7, "beta": 3.0, "reward_scaling": "returns"}),
    ("maze2d", {"expectile": 0.7, "beta": 3.0, "reward_scaling": "none", "eval_episodes": 100}),
    ("antmaze", {"expectile": 0.9, "beta": 10.0, "reward_scaling": "antmaze", "eval_episodes": 100}),
    ("quick", {"env": "halfcheetah-medium-gymv5", "device": "cpu", "cpu_threads": 1}),
])
def test_yaml_presets_load_and_flags_override_them(family, fields):
    path = ROOT / "algorithms" / "configs" / "iql" / f"{family}.yaml"
    config = iql.parse_config(iql.TrainConfig, ["--config_path", str(path), "--seed", "7"])
    assert {k: getattr(config, k) for k in fields} == fields and config.seed == 7


def raw_episode_returns(path):
    """Independently of the code under test: sum the rewards of the rows the conversion keeps, and end
    an episode at every terminal or timeout row of the file."""
    with h5py.File(path, "r") as f:
        rewards, terminals, timeouts = f["rewards"][:], f["terminals"][:], f["timeouts"][:]
    returns, current = [], 0.0
    for i in range(len(rewards)):
        if not timeouts[i] and i < len(rewards) - 1:
            current += float(rewards[i])
        if terminals[i] or timeouts[i] or i == len(rewards) - 1:
            returns.append(current)
            current = 0.0
    return np.array(returns)


def run_script(*args, timeout=600):
    return run_algorithm("iql", *args, timeout=timeout)


def test_end_to_end_run_writes_what_it_promises(tmp_path, tiny_hdf5):
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "run",
                      "--train_steps", "40", "--eval_every", "20", "--eval_episodes", "2", "--batch_size", "32",
                      "--hidden_dim", "32", "--expectile", "0.9", "--reward_scaling", "returns")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert proc.stdout.strip().splitlines()[-1] == f"results: {run / 'results.json'}"
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "iql"
    assert [e["step"] for e in results["evaluations"]] == [20, 40]
    assert results["final_normalized_score"] == results["evaluations"][-1]["normalized_score"]
    returns = raw_episode_returns(tiny_hdf5)
    assert len(returns) == 11  # ten 200-row episodes, the first split by its terminal row
    assert results["reward_scale"] == pytest.approx(1000.0 / (returns.max() - returns.min()), rel=1e-5)
    assert "expectile: 0.9" in (run / "config.yaml").read_text()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 40
    assert checkpoint["agent"]["actor_lr_schedule"]["last_epoch"] == 40
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 2


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         train_steps=60, eval_every=20, eval_episodes=1)
    full = json.loads(iql.train(replace(config, run_name="full")).read_text())
    full_agent = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["agent"]

    resumed = interrupted_then_resumed(iql, iql.IQL, config, monkeypatch)
    assert [e["step"] for e in resumed["evaluations"]] == [20, 40, 60]
    assert resumed["evaluations"] == full["evaluations"]
    resumed_agent = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["agent"]
    for net in ("actor", "critic", "target_critic", "value"):
        assert all(torch.equal(full_agent[net][k], resumed_agent[net][k]) for k in full_agent[net])
    lr = lambda agent: agent["actor_optimizer"]["param_groups"][0]["lr"]  # noqa: E731
    assert lr(resumed_agent) == lr(full_agent)
