"""algorithms/lapo.py: the advantage weights, the targets and the V clamp, the latent box, the jointly trained
CVAE, the data as LAPO sees it (z-scores, reward scaling), the loop and --resume."""
import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import lapo
from conftest import ROOT, interrupted_then_resumed, run_algorithm, write_tiny_hdf5


def tiny_config(**overrides):
    fields = dict(device="cpu", hidden_dim=32, batch_size=64, log_every=10)
    fields.update(overrides)
    return lapo.TrainConfig(**fields)


def make_agent(state_dim=4, action_dim=3, value_range=(-100.0, 100.0), mean=0.0, std=1.0, seed=0, **overrides):
    torch.manual_seed(seed)
    return lapo.LAPO(state_dim, action_dim, tiny_config(**overrides), value_range,
                     np.full(action_dim, mean), np.full(action_dim, std))


def random_batch(n, state_dim=4, action_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, state_dim, generator=g), torch.randn(n, action_dim, generator=g),
            torch.randn(n, 1, generator=g), torch.randn(n, state_dim, generator=g),
            (torch.rand(n, 1, generator=g) < 0.2).float())


def box_corners(k, scale):
    return scale * torch.tensor(np.array(np.meshgrid(*[[-1.0, 1.0]] * k)).reshape(k, -1).T, dtype=torch.float32)


def test_defaults_are_the_official_ones():
    c = lapo.TrainConfig()
    assert (c.train_steps, c.batch_size, c.eval_every, c.eval_episodes) == (1_000_000, 512, 5000, 10)
    assert (c.hidden_dim, c.n_layers, c.vae_lr, c.actor_lr, c.critic_lr) == (256, 4, 2e-4, 2e-4, 2e-4)
    assert (c.gamma, c.tau, c.expectile, c.kl_beta, c.z_max) == (0.99, 5e-3, 0.9, 1.0, 2.0)
    assert (c.target_lambda, c.policy_noise, c.noise_clip, c.reward_scaling, c.amp) == (1.0, 0.1, 0.2, "auto", False)
    agent = lapo.LAPO(11, 3, replace(c, device="cpu"), (0.0, 100.0), np.zeros(3), np.ones(3))
    assert agent.vae.latent_dim == 6
    widths = lambda net: [m.out_features for m in net.net if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert widths(agent.vae.decoder) == [256, 256, 256, 3] and widths(agent.vae.encoder) == [256, 256, 256, 12]
    assert widths(agent.actor.net) == [256, 256, 256, 6] and widths(agent.critic.v) == [256, 256, 256, 1]
    assert isinstance(agent.vae.decoder.net[-1], torch.nn.Linear)  # linear output: z-scored action space
    assert [p.shape for p in agent.critic.q.parameters()][-2:] == [torch.Size([2, 256, 1]), torch.Size([2, 1, 1])]


@pytest.mark.parametrize("expectile", [0.9, 0.7])
def test_weights_take_exactly_the_two_values_and_follow_the_sign_of_the_advantage(expectile):
    advantages = torch.cat([torch.randn(1000, 1) * 10, torch.zeros(5, 1), torch.tensor([[1e-30], [-1e-30]])])
    weights = lapo.advantage_weights(advantages, expectile)
    high, low = torch.tensor(expectile), torch.tensor(1.0 - expectile)
    assert weights.shape == advantages.shape and weights.dtype == torch.float32
    assert set(weights.unique().tolist()) == {high.item(), low.item()}
    assert torch.equal(weights == high, advantages > 0)  # A = 0 counts as not positive (official: adv > 0)


def test_the_update_weights_the_cvae_by_the_advantage_the_official_code_computes(monkeypatch):
    """A = r + gamma (1 - d) Qmix'(s', dec'(s', pi'(s'))) - V(s): target networks before the Polyak step,
    V after the critic step, lambda = 0.75 mixing min and max; the CVAE's weights are its sign."""
    agent = make_agent(target_lambda=0.75, gamma=0.9)
    with torch.no_grad():  # make online and target networks differ
        for p in [*agent.actor.parameters(), *agent.critic.parameters(), *agent.vae.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    targets = copy.deepcopy((agent.target_actor, agent.target_decoder, agent.target_critic))
    seen, original = {}, lapo.advantage_weights

    def spy(advantages, expectile):
        seen["advantages"] = advantages
        return original(advantages, expectile)

    monkeypatch.setattr(lapo, "advantage_weights", spy)
    states, actions, rewards, next_states, dones = batch = random_batch(256)
    agent.train(batch)
    target_actor, target_decoder, target_critic = targets
    with torch.no_grad():
        q = target_critic(next_states, target_decoder(next_states, target_actor(next_states)))
        mixed = 0.75 * q.min(0).values + 0.25 * q.max(0).values
        expected = rewards + 0.9 * (1 - dones) * mixed - agent.critic.v(states)  # V is unchanged after step 1
    assert torch.allclose(seen["advantages"], expected, atol=1e-5)
    assert 0.1 < (expected > 0).float().mean() < 0.9  # both signs present: the check can fail


def test_targets_use_the_online_v_and_the_v_target_stays_inside_its_clamp():
    agent = make_agent(value_range=(-3.0, 2.0), target_lambda=0.75, gamma=0.9)
    states, actions, rewards, next_states, dones = random_batch(512)
    seen = {}
    q1, q2 = torch.randn(1024, 1) * 5, torch.randn(1024, 1) * 5  # targets far outside [-3, 2]

    def scripted_critic(s, a):
        seen["critic_states"] = s
        return torch.stack([q1, q2])

    def scripted_decoder(s, z):
        seen["latents"] = z.clone()
        return torch.zeros(len(s), 3)

    agent.target_critic.forward, agent.target_decoder.forward = scripted_critic, scripted_decoder
    q_target, v_target, bootstrapped = agent.target_values(states, rewards, next_states, dones)
    mixed = 0.75 * torch.minimum(q1, q2) + 0.25 * torch.maximum(q1, q2)
    with torch.no_grad():
        assert torch.allclose(q_target, rewards + 0.9 * (1 - dones) * agent.critic.v(next_states))  # online V(s')
    assert (v_target >= -3.0).all() and (v_target <= 2.0).all()
    assert (v_target == -3.0).any() and (v_target == 2.0).any()  # the clamp binds on both sides
    assert torch.equal(v_target, mixed[:512].clamp(-3.0, 2.0))
    assert torch.allclose(bootstrapped, rewards + 0.9 * (1 - dones) * mixed[512:])  # no clamp on the advantage
    assert torch.equal(seen["critic_states"], torch.cat([states, next_states]))
    with torch.no_grad():  # the V target's latent is pi'(s) plus clipped noise, the advantage's pi'(s') exactly
        noise = seen["latents"][:512] - agent.target_actor(states)
        assert torch.equal(seen["latents"][512:], agent.target_actor(next_states))
    assert noise.abs().max() <= 0.2 + 1e-6 and (noise.abs() > 0.199).any() and noise.std() > 0.05


@pytest.mark.parametrize("amp", [False, True])
def test_random_critics_v_targets_stay_inside_the_clamp_through_training(amp):
    agent = make_agent(value_range=(-1.0, 0.5), amp=amp)
    with torch.no_grad():
        agent.target_critic.net[-1].weight.mul_(1000.0)
    batch = random_batch(256)
    for _ in range(5):
        _, v_target, _ = agent.target_values(batch[0], batch[2], batch[3], batch[4])
        assert v_target.dtype == torch.float32 and (v_target >= -1.0).all() and (v_target <= 0.5).all()
        metrics = agent.train(batch)
    assert all(torch.is_tensor(v) and v.dtype == torch.float32 and torch.isfinite(v) for v in metrics.values())


def test_every_latent_in_the_latent_box_decodes_to_a_finite_action_inside_the_action_box():
    n, z_max, mean, std = 3, 2.0, 0.1, 0.6
    agent = make_agent(action_dim=n, mean=mean, std=std, z_max=z_max)
    with torch.no_grad():  # large decoder weights: un-normalised outputs far outside [-1, 1]
        for p in agent.target_decoder.parameters():
            p.mul_(5.0)
    k = agent.vae.latent_dim
    latents = torch.cat([(torch.rand(4096, k) * 2 - 1) * z_max, box_corners(k, z_max)])
    states = torch.randn(len(latents), 4) * 3
    raw = agent.target_decoder(states, latents) * std + mean
    assert raw.abs().max() > 5  # the box is not kept trivially
    actions = agent.decode_action(states, latents)
    assert torch.isfinite(actions).all() and (actions.abs() <= 1).all() and (actions.abs() == 1).any()
    assert torch.allclose(actions, raw.clamp(-1, 1))  # inside the box, exactly the un-normalised decoder output
    assert ((raw.abs() < 1) & (actions == raw)).any()

    with torch.no_grad():  # the whole actor, its latent policy saturated at the box's corners
        agent.actor.net.net[-1].bias.copy_(torch.where(torch.arange(k) % 2 == 0, 50.0, -50.0))
        policy_latents = agent.actor(states)
    assert (policy_latents.abs() <= z_max).all() and (policy_latents.abs() > 0.99 * z_max).all()
    acted = agent.act(states)
    assert torch.isfinite(acted).all() and (acted.abs() <= 1).all()
    assert torch.equal(acted, agent.decode_action(states, policy_latents))


def test_q1_is_the_first_critic_and_differentiates_the_actions_only():
    agent = make_agent()
    states, actions = torch.randn(64, 4), torch.randn(64, 3, requires_grad=True)
    value = lapo.q1(agent.critic.q, states, actions)
    assert torch.allclose(value, agent.critic.q(states, actions)[0], atol=1e-6)
    value.sum().backward()
    assert actions.grad is not None and all(p.grad is None for p in agent.critic.parameters())


def toy_two_modes(n, seed):
    """Half the data at a = (0.6, 0.6) with reward 1, half at (-0.6, -0.6) with reward -1; every transition
    terminal, so the advantage r - V(s) is positive exactly on the first mode while V stays near 0."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, 3, generator=g)
    good = torch.arange(n) % 2 == 0
    centre = torch.where(good[:, None], 0.6, -0.6).expand(n, 2)
    actions = centre + 0.1 * torch.randn(n, 2, generator=g)
    rewards = torch.where(good, 1.0, -1.0)[:, None]
    return states, actions, rewards, torch.randn(n, 3, generator=g), torch.ones(n, 1), good


def test_jointly_trained_cvae_fits_the_high_advantage_mode():
    """V's clamp [0, 0] pins V (and so the advantage's baseline) to 0: the advantage is the reward's sign."""
    states, actions, rewards, next_states, dones, good = toy_two_modes(4096, seed=0)
    agent = make_agent(state_dim=3, action_dim=2, value_range=(0.0, 0.0), hidden_dim=32, vae_lr=1e-3,
                       actor_lr=1e-3, critic_lr=1e-3)
    held_out = slice(3072, None)
    true_weights = torch.where(good[held_out], 0.9, 0.1)[:, None]

    def weighted_reconstruction():
        torch.manual_seed(1)
        with torch.no_grad():
            reconstruction, _ = agent.vae.loss_terms(actions[held_out], states[held_out])
        return (true_weights * reconstruction).mean().item(), reconstruction

    before, _ = weighted_reconstruction()
    seen = []
    for step in range(200):
        idx = torch.randint(0, 3072, (256,))
        metrics = agent.train((states[idx], actions[idx], rewards[idx], next_states[idx], dones[idx]))
        if step >= 150:
            seen.append(metrics["positive_advantage_fraction"].item())
    after, reconstruction = weighted_reconstruction()
    assert after < 0.5 * before, (before, after)
    assert abs(np.mean(seen) - 0.5) < 0.05  # the positive advantages are the good half
    good_error, bad_error = reconstruction[good[held_out]].mean(), reconstruction[~good[held_out]].mean()
    # weights 0.9 vs 0.1: the decoder models the good mode and all but gives up the other (an unweighted CVAE
    # would fit both alike)
    assert good_error < 0.2 * bad_error, (good_error, bad_error)


def test_states_and_actions_are_z_scored_and_acting_undoes_it(tiny_hdf5):
    config = tiny_config(dataset_path=tiny_hdf5)
    data = lapo.load_offline_data(config)
    buffer = lapo.ReplayBuffer(data, "cpu")
    mean, std = lapo.zscore(buffer, data)
    assert np.allclose(buffer.state_std, data.observations.astype(np.float64).std(0) + 1e-6)
    assert buffer.states.mean(0).abs().max() < 1e-4 and (buffer.states.std(0) - 1).abs().max() < 1e-3
    assert buffer.actions.mean(0).abs().max() < 1e-4 and (buffer.actions.std(0) - 1).abs().max() < 1e-3
    assert torch.allclose(buffer.next_states[:-1][:150], buffer.states[1:151], atol=1e-5)  # same map for s'
    agent = lapo.LAPO(11, 3, config, (0.0, 1.0), mean, std)
    unnormalised = buffer.actions * agent.action_std + agent.action_mean
    assert torch.allclose(unnormalised, torch.from_numpy(data.actions), atol=1e-5)


def test_rewards_are_scaled_per_family(tmp_path):
    config = tiny_config(dataset_path=write_tiny_hdf5(tmp_path / "hopper-medium-v2.hdf5"))
    data = lapo.load_offline_data(config)
    scaled, info = lapo.scale_rewards(data, "auto", 0.99)  # locomotion (and maze2d): r / max r
    assert info["reward_scaling"] == "max" and np.allclose(scaled.rewards, data.rewards / data.rewards.max())
    assert scaled.rewards.max() == pytest.approx(1.0)
    assert (info["value_min"], info["value_max"]) == pytest.approx((scaled.rewards.min() / 0.01, 100.0))
    antmaze = replace(data, name="antmaze-umaze-diverse-v0")
    scaled, info = lapo.scale_rewards(antmaze, "auto", 0.99)  # antmaze: 100 r, V in [0, 100]
    assert info["reward_scaling"] == "antmaze" and np.allclose(scaled.rewards, 100 * data.rewards)
    assert (info["value_min"], info["value_max"]) == (0.0, 100.0)
    scaled, info = lapo.scale_rewards(data, "none", 0.9)
    assert np.array_equal(scaled.rewards, data.rewards) and info["value_max"] == pytest.approx(data.rewards.max() * 10)
    with pytest.raises(SystemExit, match="largest reward"):
        lapo.scale_rewards(replace(data, rewards=-np.abs(data.rewards)), "max", 0.99)
    with pytest.raises(SystemExit, match="--reward_scaling must be"):
        lapo.scale_rewards(data, "returns", 0.99)


def test_polyak_moves_every_target_by_tau_and_nothing_else():
    agent = make_agent(tau=0.25)
    before = copy.deepcopy((agent.target_actor, agent.target_decoder, agent.target_critic))
    agent.train(random_batch(64))
    for target, old, online in zip((agent.target_actor, agent.target_decoder, agent.target_critic), before,
                                   (agent.actor, agent.vae.decoder, agent.critic.q)):
        for t, o, s in zip(target.parameters(), old.parameters(), online.parameters()):
            assert torch.allclose(t, 0.75 * o + 0.25 * s, atol=1e-6)


def test_end_to_end_run_writes_what_it_promises(tmp_path, tiny_hdf5):
    proc = run_algorithm("lapo", "--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "run",
                         "--train_steps", "40", "--eval_every", "20", "--eval_episodes", "2", "--batch_size", "32",
                         "--hidden_dim", "32", "--log_every", "10")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert proc.stdout.strip().splitlines()[-1] == f"results: {run / 'results.json'}"
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "lapo" and [e["step"] for e in results["evaluations"]] == [20, 40]
    assert results["final_normalized_score"] == results["evaluations"][-1]["normalized_score"]
    assert results["reward_scaling"] == "max" and results["value_max"] == pytest.approx(100.0)
    assert "hidden_dim: 32" in (run / "config.yaml").read_text()
    agent = torch.load(run / "checkpoint.pt", weights_only=True)["agent"]
    assert agent["target_decoder"]["net.6.weight"].shape == (3, 32)  # the odd action dimension
    assert agent["vae"]["encoder.net.6.weight"].shape == (12, 32)  # latent 2 x 3, mean and log-variance
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "vae_loss" in m] == [10, 20, 30, 40]
    assert all(np.isfinite(m["critic_loss"]) for m in metrics if "critic_loss" in m)


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         train_steps=60, eval_every=20, eval_episodes=2, batch_size=32)
    full = json.loads(lapo.train(replace(config, run_name="full")).read_text())
    resumed = interrupted_then_resumed(lapo, lapo.LAPO, config, monkeypatch, stop_after=30)
    assert [e["step"] for e in resumed["evaluations"]] == [20, 40, 60]
    assert resumed["evaluations"] == full["evaluations"]
    full_agent = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["agent"]
    resumed_agent = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["agent"]
    for net in ("vae", "target_decoder", "actor", "target_actor", "critic", "target_critic"):
        assert all(torch.equal(full_agent[net][k], resumed_agent[net][k]) for k in full_agent[net])


def test_presets_load_and_hold_the_official_values():
    load = lambda name, *flags: lapo.parse_config(  # noqa: E731
        lapo.TrainConfig, ["--config_path", str(ROOT / "algorithms/configs/lapo" / name), *flags])
    quick = load("quick.yaml")
    assert quick.env == "halfcheetah-medium-gymv5" and quick.train_steps == 10_000 and quick.cpu_threads == 1
    medium = load("medium.yaml")
    assert replace(medium, config_path=None) == replace(lapo.TrainConfig(), train_steps=50_000, eval_every=2500)
    maze = load("maze2d-umaze-v1.yaml")
    assert maze.kl_beta == 0.3 and maze.env == "maze2d-umaze-v1"
    hopper = load("hopper-medium-v2.yaml")
    assert replace(hopper, config_path=None) == lapo.TrainConfig(env="hopper-medium-v2", reward_scaling="max")
    assert replace(maze, config_path=None) == lapo.TrainConfig(env="maze2d-umaze-v1", kl_beta=0.3, reward_scaling="max")
