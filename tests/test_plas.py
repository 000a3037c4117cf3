"""algorithms/plas.py: the CVAE, the latent box, BCQ's soft clipped double-Q target, both phases, the loop."""
import copy
import json
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

import plas
from conftest import ROOT, run_algorithm, toy_conditional_data


def tiny_config(**overrides):
    fields = dict(device="cpu", vae_hidden=32, vae_steps=40, vae_batch_size=64, vae_save_every=10, log_every=10,
                  batch_size=32)
    fields.update(overrides)
    return plas.TrainConfig(**fields)


def box_corners(k, scale):
    return scale * torch.tensor(np.array(np.meshgrid(*[[-1.0, 1.0]] * k)).reshape(k, -1).T, dtype=torch.float32)


def test_defaults_are_the_official_ones():
    c = plas.TrainConfig()
    assert (c.vae_hidden, c.vae_steps, c.vae_batch_size, c.vae_lr, c.vae_kl_weight) == (750, 500_000, 100, 1e-4, 0.5)
    assert (c.train_steps, c.batch_size, c.actor_lr, c.critic_lr, c.tau) == (500_000, 100, 1e-4, 1e-3, 5e-3)
    assert (c.z_max, c.target_lambda, c.phi, c.normalize_states) == (2.0, 0.75, 0.0, False)
    vae = plas.ConditionalVAE(3, 11, c.vae_hidden)
    assert vae.latent_dim == 6 and [m.out_features for m in vae.decoder if hasattr(m, "out_features")] == [750, 750, 3]


def test_vae_loss_decreases_on_a_toy_conditional_dataset():
    torch.manual_seed(0)
    actions, states = toy_conditional_data(4000)
    vae = plas.ConditionalVAE(2, 3, 64)
    trainer = plas.VAEPretrainer(vae, tiny_config(vae_lr=1e-3))

    def held_out():
        torch.manual_seed(1)
        with torch.no_grad():
            reconstruction, kl = vae.elbo_terms(actions[3000:], states[3000:])
            # the decoder at the prior's mean should predict the state-dependent centre
            centre_error = ((vae.decode(torch.zeros(1000, vae.latent_dim), states[3000:]) - actions[3000:]) ** 2).mean()
        return (reconstruction + 0.5 * kl).item(), centre_error.item()

    loss_before, centre_before = held_out()
    for _ in range(600):
        idx = torch.randint(0, 3000, (100,))
        trainer.train(actions[idx], states[idx])
    loss_after, centre_after = held_out()
    assert loss_after < 0.3 * loss_before, (loss_before, loss_after)
    assert centre_after < 0.3 * centre_before, (centre_before, centre_after)


@pytest.mark.parametrize("phi", [0.0, 0.05])
def test_every_latent_in_the_latent_box_decodes_inside_the_action_box(phi):
    torch.manual_seed(0)
    n, z_max = 3, 2.0
    vae = plas.ConditionalVAE(n, 4, 32)
    with torch.no_grad():  # large decoder weights: raw outputs far outside [-1, 1]
        for p in vae.decoder.parameters():
            p.mul_(20.0)
    k = vae.latent_dim
    latents = torch.cat([(torch.rand(4096, k) * 2 - 1) * z_max, box_corners(k, z_max)])
    states = torch.randn(len(latents), 4) * 3
    assert vae.decoder(torch.cat([states, latents], -1)).abs().max() > 5  # the box is not trivially kept
    actions = vae.decode(latents, states)
    assert torch.isfinite(actions).all() and (actions.abs() <= 1).all()
    assert (actions.abs() > 0.999).any()  # and the box is reached, not shrunk

    # The whole actor, its latent policy saturated at the box's corners and the perturbation pushing out.
    agent = plas.PLAS(vae, 4, n, tiny_config(phi=phi, z_max=z_max))
    with torch.no_grad():
        agent.actor.latent_policy.net[-1].bias.copy_(torch.where(torch.arange(k) % 2 == 0, 50.0, -50.0))
        if phi > 0:
            agent.actor.perturbation.net[-1].bias.fill_(50.0)
    policy_latents, policy_actions = agent.actor(states, agent.vae)
    assert (policy_latents.abs() <= z_max).all() and (policy_latents.abs() > 0.99 * z_max).all()
    assert torch.isfinite(policy_actions).all() and (policy_actions.abs() <= 1).all()
    assert torch.equal(agent.act(states), policy_actions.detach())


def test_target_is_lambda_min_plus_one_minus_lambda_max_at_the_target_actors_action():
    torch.manual_seed(0)
    agent = plas.PLAS(plas.ConditionalVAE(3, 4, 32), 4, 3, tiny_config(gamma=0.9))
    with torch.no_grad():  # make the online actor differ from the target actor
        for p in agent.actor.parameters():
            p.add_(torch.randn_like(p))
    q1 = torch.tensor([[1.0], [5.0], [-2.0], [3.0]])
    q2 = torch.tensor([[4.0], [2.0], [-6.0], [3.0]])
    seen = {}

    def scripted(states, actions):
        seen["actions"] = actions
        return torch.stack([q1, q2])  # [2, B, 1]

    agent.target_critic.forward = scripted
    rewards, dones = torch.tensor([[0.5], [-1.0], [2.0], [0.0]]), torch.tensor([[0.0], [0.0], [1.0], [0.0]])
    next_states = torch.randn(4, 4)
    target = agent.target_values(rewards, next_states, dones)
    # 0.75 min + 0.25 max: 1.75, 2.75, (terminal), 3.0
    expected = torch.tensor([[0.5 + 0.9 * 1.75], [-1.0 + 0.9 * 2.75], [2.0], [0.9 * 3.0]])
    assert torch.allclose(target, expected, atol=1e-6)
    assert torch.allclose(seen["actions"], agent.target_actor(next_states, agent.vae)[1])
    assert not torch.allclose(seen["actions"], agent.actor(next_states, agent.vae)[1])


def test_each_critic_learns_a_known_value():
    """Every transition terminal with reward 1: Q1 and Q2 must each approach 1."""
    torch.manual_seed(0)
    agent = plas.PLAS(plas.ConditionalVAE(3, 4, 32), 4, 3, tiny_config())
    states, actions = torch.randn(256, 4), torch.rand(256, 3) * 1.8 - 0.9
    batch = (states, actions, torch.ones(256, 1), torch.randn(256, 4), torch.ones(256, 1))
    with torch.no_grad():
        first = ((agent.critic(states, actions) - 1.0) ** 2).mean(dim=(1, 2))  # per critic
    for _ in range(300):
        agent.train(batch)
    with torch.no_grad():
        q = agent.critic(states, actions)
    assert (((q - 1.0) ** 2).mean(dim=(1, 2)) < 0.05 * first).all()
    assert ((q - 1.0).abs().mean(dim=(1, 2)) < 0.05).all()
    assert torch.allclose(agent.critic.q1(states, actions), q[0], atol=1e-5)


def test_amp_runs_actor_and_critics_in_bfloat16_and_returns_float32():
    torch.manual_seed(0)
    agent = plas.PLAS(plas.ConditionalVAE(3, 4, 32), 4, 3, tiny_config(amp=True, phi=0.05))
    states, actions = torch.randn(64, 4), torch.rand(64, 3) * 1.8 - 0.9
    metrics = agent.train((states, actions, torch.randn(64, 1), torch.randn(64, 4), torch.zeros(64, 1)))
    assert all(torch.isfinite(v).all() for v in metrics.values())
    float32_actor, float32_critic = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)
    float32_critic.amp = float32_actor.latent_policy.amp = float32_actor.perturbation.amp = False
    with torch.no_grad():
        for amp_out, exact in [(agent.actor(states, agent.vae)[0], float32_actor(states, agent.vae)[0]),
                               (agent.critic(states, actions), float32_critic(states, actions)),
                               (agent.critic.q1(states, actions), float32_critic.q1(states, actions))]:
            assert amp_out.dtype == torch.float32
            assert 0 < (amp_out - exact).abs().max() < 0.05 * (1 + exact.abs().max())  # bfloat16 rounding


def test_actor_climbs_q1_through_the_frozen_decoder():
    """A scripted Q1 that prefers a reachable action: the decoded policy action approaches it, the VAE never changes."""
    torch.manual_seed(0)
    vae = plas.ConditionalVAE(2, 4, 32)
    agent = plas.PLAS(vae, 4, 2, tiny_config(actor_lr=1e-3))
    before_vae = {k: v.clone() for k, v in vae.state_dict().items()}
    states = torch.randn(128, 4)
    with torch.no_grad():
        target = vae.decode(torch.tensor([1.5, -1.0, 0.5, -1.5]).expand(128, -1), states)
    agent.critic.q1 = lambda s, a: -((a - target) ** 2).sum(-1, keepdim=True)
    batch = (states, torch.rand(128, 2) * 1.8 - 0.9, torch.zeros(128, 1), states, torch.ones(128, 1))
    distance_before = (agent.act(states) - target).abs().mean()
    for _ in range(200):
        agent.train(batch)
    assert (agent.act(states) - target).abs().mean() < 0.3 * distance_before
    assert all(p.grad is None and not p.requires_grad for p in vae.parameters())
    assert all(torch.equal(v, before_vae[k]) for k, v in vae.state_dict().items())


def run_script(*args, timeout=600):
    return run_algorithm("plas", *args, timeout=timeout)


TINY_FLAGS = ["--train_steps", "40", "--eval_every", "20", "--eval_episodes", "2", "--batch_size", "32",
              "--vae_steps", "20", "--vae_save_every", "10", "--vae_hidden", "32", "--log_every", "10"]


def test_end_to_end_run_writes_what_it_promises(tmp_path, tiny_hdf5):
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "run",
                      "--phi", "0.05", *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert proc.stdout.strip().splitlines()[-1] == f"results: {run / 'results.json'}"
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "plas" and [e["step"] for e in results["evaluations"]] == [20, 40]
    assert results["final_normalized_score"] == results["evaluations"][-1]["normalized_score"]
    assert np.isfinite(results["vae_final_loss"])
    assert "vae_hidden: 32" in (run / "config.yaml").read_text()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (checkpoint["phase"], checkpoint["step"]) == ("rl", 40)
    assert "perturbation.net.0.weight" in checkpoint["agent"]["actor"]
    vae = torch.load(run / "vae.pt", weights_only=True)
    assert vae["sizes"]["latent_dim"] == 6  # 2 x the (odd) action dimension
    assert torch.equal(vae["state_mean"], torch.zeros(11)) and torch.equal(vae["state_std"], torch.ones(11))  # raw
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["phase"], m["step"]) for m in metrics if "vae/loss" in m] == [("vae", 10), ("vae", 20)]
    # --vae_checkpoint skips phase 1
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "reuse",
                      "--vae_checkpoint", str(run / "vae.pt"), *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert "vae/loss" not in (tmp_path / "reuse" / "metrics.jsonl").read_text()
    assert not (tmp_path / "reuse" / "vae.pt").exists()


@pytest.mark.parametrize("stop_in", ["vae", "rl"])
def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch, stop_in):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         train_steps=60, eval_every=20, eval_episodes=2)
    full = json.loads(plas.train(replace(config, run_name="full")).read_text())
    full_agent = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["agent"]

    owner = plas.VAEPretrainer if stop_in == "vae" else plas.PLAS
    calls, original = {"n": 0}, owner.train

    def stop_after_25(self, *batch):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt  # a kill after the checkpoint of step 20
        return original(self, *batch)

    monkeypatch.setattr(owner, "train", stop_after_25)
    with pytest.raises(KeyboardInterrupt):
        plas.train(replace(config, run_name="stopped"))
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert (saved["phase"], saved["step"]) == (stop_in, 20)
    monkeypatch.setattr(owner, "train", original)
    resumed = json.loads(plas.train(replace(config, resume=str(tmp_path / "stopped"))).read_text())
    assert [e["step"] for e in resumed["evaluations"]] == [20, 40, 60]
    assert resumed["evaluations"] == full["evaluations"] and resumed["vae_final_loss"] == full["vae_final_loss"]
    resumed_agent = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["agent"]
    for net in ("actor", "target_actor", "critic", "target_critic"):
        assert all(torch.equal(full_agent[net][k], resumed_agent[net][k]) for k in full_agent[net])


def test_a_polite_stop_in_phase_1_checkpoints_that_step_and_resumes_exactly(tmp_path, tiny_hdf5, monkeypatch):
    """SIGTERM or Ctrl-C between two phase-1 checkpoints (and two logs): the stop saves the step it reached, with the
    losses summed since the last log, so the resumed run logs and keeps what the uninterrupted one does."""
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         vae_save_every=20, train_steps=20, eval_every=20, eval_episodes=2)
    full = json.loads(plas.train(replace(config, run_name="full")).read_text())
    calls, original = {"n": 0}, plas.VAEPretrainer.train

    def stop_at_25(self, *batch):
        calls["n"] += 1
        if calls["n"] == 25:
            monkeypatch.setattr(plas.Run, "stop_signal", signal.SIGTERM)  # what polite_stop records
        return original(self, *batch)

    monkeypatch.setattr(plas.VAEPretrainer, "train", stop_at_25)
    with pytest.raises(KeyboardInterrupt):
        plas.train(replace(config, run_name="stopped"))
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert (saved["phase"], saved["step"], saved["since_log"]) == ("vae", 25, 5)
    monkeypatch.setattr(plas.Run, "stop_signal", None)
    monkeypatch.setattr(plas.VAEPretrainer, "train", original)
    resumed = json.loads(plas.train(replace(config, resume=str(tmp_path / "stopped"))).read_text())
    assert resumed["evaluations"] == full["evaluations"] and resumed["vae_final_loss"] == full["vae_final_loss"]
    logged = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("full", "stopped")]
    assert [json.loads(line) for line in logged[0] if '"vae"' in line] == \
        [json.loads(line) for line in logged[1] if '"vae"' in line]


def test_raw_states_by_default_and_normalised_on_request(tmp_path, tiny_hdf5):
    data = plas.load_offline_data(tiny_config(dataset_path=tiny_hdf5))
    raw = plas.ReplayBuffer(data, "cpu")
    plas.use_raw_states(raw, data)
    assert torch.equal(raw.states, torch.from_numpy(data.observations))
    assert torch.equal(raw.next_states, torch.from_numpy(data.next_observations))
    assert (raw.state_mean == 0).all() and (raw.state_std == 1).all()
    normalised = plas.ReplayBuffer(data, "cpu")
    assert normalised.states.mean(0).abs().max() < 1e-4


def test_bad_vae_checkpoint_gives_one_clear_error(tmp_path, tiny_hdf5):
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), *TINY_FLAGS,
                      "--vae_checkpoint", str(tmp_path / "missing.pt"), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == \
        [f"error: --vae_checkpoint {tmp_path / 'missing.pt'} does not exist"]


def test_presets_load_and_the_locomotion_preset_is_the_official_defaults():
    quick = plas.parse_config(plas.TrainConfig, ["--config_path", str(ROOT / "algorithms/configs/plas/quick.yaml")])
    assert quick.env == "halfcheetah-medium-gymv5" and quick.train_steps < plas.TrainConfig().train_steps
    path = str(ROOT / "algorithms/configs/plas/locomotion.yaml")
    official = plas.parse_config(plas.TrainConfig, ["--config_path", path, "--env", "hopper-medium-v2"])
    assert replace(official, config_path=None) == plas.TrainConfig(env="hopper-medium-v2")
    replay = plas.parse_config(plas.TrainConfig, ["--config_path", path, "--vae_hidden", "128"])
    assert replay.vae_hidden == 128 and replay.batch_size == 100
