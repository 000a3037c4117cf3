"""algorithms/cnf_vae.py: CNF's update through PLAS's frozen CVAE decoder (Fig. 7's CNF-VAE)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import cnf_vae
import plas
from conftest import ROOT, interrupted_then_resumed, run_algorithm, script_critic


def tiny_config(**overrides):
    fields = dict(device="cpu", vae_hidden=32, vae_steps=20, vae_batch_size=64, vae_save_every=10, log_every=10,
                  hidden_dim=32, n_layers=3, batch_size=32)
    fields.update(overrides)
    return cnf_vae.TrainConfig(**fields)


def test_the_policy_is_cnfs_stretched_to_the_vae_latent_range():
    c = cnf_vae.TrainConfig()
    assert (c.z_max, c.vae_hidden, c.vae_steps, c.hidden_dim, c.n_layers, c.awac_lambda) == \
        (2.0, 750, 500_000, 256, 4, 1 / 3)
    torch.manual_seed(0)
    policy = cnf_vae.LatentPolicy(4, 6, 32, 3, z_max=2.0)
    states = torch.randn(4096, 4) * 3
    latents = policy(states)
    assert latents.shape == (4096, 6) and (latents.abs() < 2.0).all()
    assert latents.abs().max() > 1.0  # uses the range beyond CNF's (-1, 1)
    with torch.no_grad():  # mean and sigma at their extremes: still inside the closed box, finite
        policy.net[-1].bias.copy_(torch.cat([torch.full((6,), 1e4), torch.full((6,), 50.0)]))
    extreme = policy(states)
    assert torch.isfinite(extreme).all() and (extreme.abs() <= 2.0).all()
    assert torch.equal(policy.deterministic(states), torch.full((4096, 6), 2.0))


def test_decoder_gets_no_gradient_and_latents_stay_in_the_box():
    """Phase 2 through the frozen decoder: the VAE never changes and receives no gradient, the
    policy's latents (sampled, targets' and acting's) stay in z_max (-1, 1)^k, the actor does learn."""
    torch.manual_seed(0)
    vae = cnf_vae.ConditionalVAE(3, 4, 32)
    agent = cnf_vae.CNFVAE(vae, 4, 3, tiny_config(z_max=1.5))
    vae_before = {k: v.clone() for k, v in vae.state_dict().items()}
    actor_before = [p.clone() for p in agent.actor.parameters()]
    decoded = []
    original_decode = vae.decode

    def watched_decode(latents, states):
        decoded.append(latents.detach())
        return original_decode(latents, states)

    vae.decode = watched_decode
    states = torch.randn(64, 4)
    batch = (states, torch.rand(64, 3) * 1.8 - 0.9, torch.randn(64, 1), torch.randn(64, 4), torch.zeros(64, 1))
    for _ in range(20):
        agent.train(batch)
        assert all(p.grad is None and not p.requires_grad for p in vae.parameters())
    agent.act(states)
    assert len(decoded) == 2 * 20 + 1
    latents = torch.cat(decoded)
    assert latents.shape[1] == 6 and (latents.abs() < 1.5).all()
    assert all(torch.equal(v, vae_before[k]) for k, v in vae.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor_before))


def test_each_critic_learns_a_known_value():
    """Every transition terminal with reward 1: Q1 and Q2 must each approach 1."""
    torch.manual_seed(0)
    agent = cnf_vae.CNFVAE(cnf_vae.ConditionalVAE(3, 4, 32), 4, 3, tiny_config(critic_lr=1e-3))
    states, actions = torch.randn(256, 4), torch.rand(256, 3) * 1.8 - 0.9
    batch = (states, actions, torch.ones(256, 1), torch.randn(256, 4), torch.ones(256, 1))
    with torch.no_grad():
        first = ((agent.critic(states, actions) - 1.0) ** 2).mean(dim=(1, 2))  # per critic
    for _ in range(400):
        agent.train(batch)
    with torch.no_grad():
        q = agent.critic(states, actions)
    assert (((q - 1.0) ** 2).mean(dim=(1, 2)) < 0.05 * first).all()
    assert ((q - 1.0).abs().mean(dim=(1, 2)) < 0.05).all()


def test_policy_moves_toward_high_advantage_actions():
    """A scripted critic that prefers one action the decoder can reach: the decoded policy action approaches it."""
    torch.manual_seed(0)
    vae = cnf_vae.ConditionalVAE(2, 4, 32)
    agent = cnf_vae.CNFVAE(vae, 4, 2, tiny_config(actor_lr=3e-3))
    states = torch.randn(128, 4)
    with torch.no_grad():
        target = vae.decode(torch.tensor([1.2, -0.8, 0.4, -1.2]).expand(128, -1), states)
    script_critic(agent, lambda a: -((a - target.repeat(len(a) // 128, 1)) ** 2).sum(-1, keepdim=True))
    actions = torch.cat([target[:64], torch.rand(64, 2) * 1.8 - 0.9])
    batch = (states, actions, torch.zeros(128, 1), states, torch.ones(128, 1))
    before = (agent.act(states) - target).abs().mean()
    for _ in range(300):
        agent.train(batch)
    assert (agent.act(states) - target).abs().mean() < 0.5 * before


def test_a_plas_vae_fits_only_when_it_saw_the_same_states(tmp_path, tiny_hdf5):
    """cnf_vae.py normalises states; a plas.py VAE trained on raw states is refused, one trained with
    --normalize_states is accepted and decodes exactly as it did in plas.py."""
    config = tiny_config(dataset_path=tiny_hdf5)
    data = cnf_vae.load_offline_data(config)
    buffer = cnf_vae.ReplayBuffer(data, "cpu")

    for normalize in (False, True):
        plas_config = plas.TrainConfig(device="cpu", dataset_path=tiny_hdf5, vae_hidden=16, vae_steps=0,
                                       normalize_states=normalize, wandb_mode="disabled",
                                       checkpoints_path=str(tmp_path), run_name=f"plas-{normalize}")
        plas_data = plas.load_offline_data(plas_config)
        plas_buffer = plas.ReplayBuffer(plas_data, "cpu")
        if not normalize:
            plas.use_raw_states(plas_buffer, plas_data)
        run = plas.start_run(plas_config, plas_data)
        run_dir = run.dir
        plas_vae = plas.pretrain_vae(plas_config, plas_buffer, run)
        run.logger.close()
        if not normalize:
            with pytest.raises(SystemExit, match="saw other states"):
                cnf_vae.load_vae(str(run_dir / "vae.pt"), buffer, "cpu")
        else:
            vae = cnf_vae.load_vae(str(run_dir / "vae.pt"), buffer, "cpu")
            latents = torch.randn(32, vae.latent_dim)
            assert torch.equal(vae.decode(latents, buffer.states[:32]),
                               plas_vae.decode(latents, plas_buffer.states[:32]))


def run_script(*args, timeout=600):
    return run_algorithm("cnf_vae", *args, timeout=timeout)


TINY_FLAGS = ["--train_steps", "40", "--eval_every", "20", "--eval_episodes", "2", "--batch_size", "32",
              "--vae_steps", "20", "--vae_save_every", "10", "--vae_hidden", "32", "--log_every", "10",
              "--hidden_dim", "32", "--n_layers", "3"]


def test_end_to_end_run_writes_what_it_promises(tmp_path, tiny_hdf5):
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "run",
                      *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert proc.stdout.strip().splitlines()[-1] == f"results: {run / 'results.json'}"
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "cnf_vae" and [e["step"] for e in results["evaluations"]] == [20, 40]
    assert np.isfinite(results["vae_final_loss"])
    assert "z_max: 2.0" in (run / "config.yaml").read_text()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (checkpoint["phase"], checkpoint["step"]) == ("rl", 40)
    assert torch.load(run / "vae.pt", weights_only=True)["sizes"]["latent_dim"] == 6
    # --vae_checkpoint skips phase 1
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "reuse",
                      "--vae_checkpoint", str(run / "vae.pt"), *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert "vae/loss" not in (tmp_path / "reuse" / "metrics.jsonl").read_text()


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         train_steps=60, eval_every=20, eval_episodes=2)
    full = json.loads(cnf_vae.train(replace(config, run_name="full")).read_text())
    full_actor = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["agent"]["actor"]

    resumed = interrupted_then_resumed(cnf_vae, cnf_vae.CNFVAE, config, monkeypatch)
    assert resumed["evaluations"] == full["evaluations"] and len(full["evaluations"]) == 3
    resumed_actor = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["agent"]["actor"]
    assert all(torch.equal(full_actor[k], resumed_actor[k]) for k in full_actor)


def test_quick_preset_loads():
    quick = cnf_vae.parse_config(cnf_vae.TrainConfig,
                                 ["--config_path", str(ROOT / "algorithms/configs/cnf_vae/quick.yaml")])
    assert quick.env == "halfcheetah-medium-gymv5" and quick.train_steps < cnf_vae.TrainConfig().train_steps
    assert quick.vae_steps < cnf_vae.TrainConfig().vae_steps and quick.z_max == 2.0
