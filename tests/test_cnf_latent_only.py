"""algorithms/cnf_latent_only.py: encoding the dataset once, RL purely in latent space with no
gradient through the flow (Fig. 9, Appendix A.4), the run loop and bad input."""
import copy
import json
from dataclasses import replace

import numpy as np
import torch

import cnf_latent_only as lo
import conftest
from conftest import (ROOT, TINY_FLOW_RUN_FLAGS, interrupted_then_resumed, run_algorithm, script_critic,
                      tiny_flow_config)


def random_flow(action_dim, **kwargs):
    return conftest.random_flow(lo.ConditionalFlow, action_dim, **kwargs)


def tiny_config(**overrides):
    return tiny_flow_config(lo.TrainConfig, **overrides)


# ---- encoding the dataset --------------------------------------------------------------------------
def test_encoded_dataset_decodes_back_to_its_actions_float64():
    """Chunked encoding (a chunk that does not divide N) then f^-1: the dataset's actions again."""
    flow = lo.FrozenFlow(random_flow(3))
    actions = torch.rand(5000, 3, dtype=torch.float64) * 1.998 - 0.999
    states = torch.randn(5000, 4, dtype=torch.float64)
    latents, edge_fraction = lo.encode_dataset(flow, actions, states, chunk=1536)
    assert edge_fraction == 0
    assert torch.equal(latents[1536:3072], flow.encode(actions[1536:3072], states[1536:3072])[0])
    assert (flow.decode(latents, states) - actions).abs().max() < 1e-4


def test_encoded_dataset_decodes_back_to_its_actions_float32_away_from_the_edge():
    """float32 spaces latents ~6e-8 apart near |z| = 1, and f^-1 starts with atanh, whose slope
    1 / (1 - z^2) turns that step into ~3e-8 / (1 - |z|) before the blocks: latents at least 1e-4
    from the edge come back within 1e-4 (measured: <= 4e-5), closer ones lose up to ~3e-4. Latents
    beyond the clamp f^-1 applies (|z| > 1 - 1e-5) are clamped to it and keep their side of the box;
    their fraction is what the script reports as latent_edge_fraction."""
    flow = random_flow(3, dtype=torch.float32)
    with torch.no_grad():  # stretch the last block so that the box's outer actions reach the latent edge
        flow.blocks[-1].actnorm.log_scale.add_(0.7)
    exact = copy.deepcopy(flow).double()
    flow = lo.FrozenFlow(flow)
    actions = torch.rand(20_000, 3) * 1.998 - 0.999
    states = torch.randn(20_000, 4)
    latents, edge_fraction = lo.encode_dataset(flow, actions, states)
    with torch.no_grad():
        exact_latents = exact.encode(actions.double(), states.double())[0]
    beyond = exact_latents.abs() > 1 - lo.ACTION_EPS
    assert 0.02 < edge_fraction < 0.5 and abs(edge_fraction - beyond.any(-1).double().mean()) < 1e-3
    assert (latents.abs() <= 1 - lo.ACTION_EPS).all()  # what f^-1 decodes without clamping again
    assert torch.equal(torch.sign(latents[beyond]), torch.sign(exact_latents[beyond]).float())
    inside = (latents.abs() <= 1 - 1e-4).all(-1)
    assert inside.float().mean() > 0.5
    assert (flow.decode(latents[inside], states[inside]) - actions[inside]).abs().max() < 1e-4


def test_the_buffer_samples_latents_row_aligned_with_the_transitions():
    flow = lo.FrozenFlow(random_flow(3, state_dim=11, dtype=torch.float32))
    rng = np.random.default_rng(0)
    data = lo.OfflineData("toy", rng.normal(size=(500, 11)).astype(np.float32),
                          rng.uniform(-0.9, 0.9, (500, 3)).astype(np.float32), np.zeros(500, np.float32),
                          rng.normal(size=(500, 11)).astype(np.float32), np.zeros(500, np.float32), None, None)
    buffer = lo.ReplayBuffer(data, "cpu")
    latent_buffer = lo.LatentReplayBuffer(buffer, lo.encode_dataset(flow, buffer.actions, buffer.states)[0])
    assert latent_buffer.state_mean is buffer.state_mean and latent_buffer.state_std is buffer.state_std  # evaluation
    torch.manual_seed(3)
    states, actions, *rest = buffer.sample(64)  # the plain buffer's draw
    torch.manual_seed(3)
    latent_states, latents, *latent_rest = latent_buffer.sample(64)  # the same random draw, latents instead
    assert torch.equal(states, latent_states) and all(torch.equal(a, b) for a, b in zip(rest, latent_rest))
    assert torch.allclose(latents, flow.encode(actions, states)[0], atol=1e-6)


# ---- phase 2 ---------------------------------------------------------------------------------------
def latent_batch(n=256, state_dim=4, latent_dim=3, terminal=True):
    states = torch.randn(n, state_dim)
    latents = torch.rand(n, latent_dim) * 1.8 - 0.9
    return states, latents, torch.ones(n, 1), torch.randn(n, state_dim), torch.full((n, 1), float(terminal))


def test_the_flow_gets_no_gradient_and_does_not_change_in_phase_2():
    torch.manual_seed(0)
    flow = random_flow(3, dtype=torch.float32)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    agent = lo.LatentOnlyCNF(flow, 4, 3, tiny_config())
    actor_before = [p.clone() for p in agent.actor.parameters()]
    batch = latent_batch()
    for _ in range(10):
        agent.train(batch)
    agent.act(batch[0])
    assert all(p.grad is None for p in flow.parameters())
    assert all(torch.equal(v, before[k]) for k, v in flow.state_dict().items())
    assert not any(torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor_before))  # the policy did learn
    assert all(p.grad is not None for p in agent.actor.parameters())


def test_the_update_never_calls_the_flow():
    """Critics and policy see only (s, z): f and f^-1 may run to act, never in `train`."""
    torch.manual_seed(0)
    agent = lo.LatentOnlyCNF(random_flow(3, dtype=torch.float32), 4, 3, tiny_config())

    def forbidden(*_):
        raise AssertionError("the flow was called during an update")

    methods = ("encode", "decode", "decode_blocks", "forward", "log_prob")
    for name in methods:
        setattr(agent.flow, name, forbidden)
    for _ in range(3):
        agent.train(latent_batch())
    for name in methods:
        delattr(agent.flow, name)  # the class's methods again
    actions = agent.act(torch.randn(8, 4))
    assert actions.shape == (8, 3) and (actions.abs() < 1).all()


def test_critics_learn_a_known_value_in_latent_space():
    """Every transition terminal with reward 1: both critics Q(s, z) must approach 1."""
    torch.manual_seed(0)
    agent = lo.LatentOnlyCNF(random_flow(3, dtype=torch.float32), 4, 3, tiny_config(critic_lr=1e-3))
    batch = latent_batch()
    first = agent.train(batch)["critic_loss"].item()
    for _ in range(300):
        last = agent.train(batch)
    assert last["critic_loss"].item() < 0.05 * first
    assert (agent.critic(batch[0], batch[1]) - 1.0).abs().mean() < 0.05


def test_critic_target_bootstraps_from_the_policy_latent_at_the_next_state():
    """y = r + gamma min Q'(s', z'), z' ~ pi(. | s'): with a scripted target critic that is large only
    for latents near z*, the target is large exactly when the policy proposes z* at s'."""
    torch.manual_seed(0)
    agent = lo.LatentOnlyCNF(random_flow(3, dtype=torch.float32), 4, 3, tiny_config(gamma=0.5))
    star = torch.tensor([0.5, -0.5, 0.25])
    agent.target_critic.forward = lambda s, z: (10.0 * (((z - star) ** 2).sum(-1, keepdim=True) < 1e-4)).expand(
        2, -1, -1)
    agent.critic.forward = lambda s, z: torch.zeros(2, len(s), 1, requires_grad=True)  # loss = 2 mean(y^2)
    batch = latent_batch(terminal=False)  # r = 1, not done
    for policy_latent, target in ((star, 1.0 + 0.5 * 10.0), (-star, 1.0)):
        agent.actor.forward = lambda s, z=policy_latent: z.expand(len(s), -1).clone().requires_grad_()
        loss = agent.train(batch)["critic_loss"]
        assert torch.isclose(loss, torch.tensor(2 * target ** 2), rtol=1e-5), (loss, target)


def test_policy_moves_toward_high_advantage_latents():
    """With a critic that prefers one data latent, the policy's mean latent approaches it."""
    torch.manual_seed(0)
    agent = lo.LatentOnlyCNF(random_flow(2, dtype=torch.float32), 4, 2, tiny_config(actor_lr=3e-3))
    target = torch.tensor([0.6, -0.4])
    script_critic(agent, lambda z: -((z - target) ** 2).sum(-1, keepdim=True))
    states = torch.randn(128, 4)
    latents = torch.cat([target.expand(64, 2), torch.rand(64, 2) * 1.8 - 0.9])
    batch = (states, latents, torch.zeros(128, 1), states, torch.ones(128, 1))
    before = (agent.actor.deterministic(states) - target).abs().mean()
    for _ in range(300):
        agent.train(batch)
    after = (agent.actor.deterministic(states) - target).abs().mean()
    assert after < 0.5 * before


# ---- the run loop ----------------------------------------------------------------------------------
def run_script(*args, timeout=600):
    return run_algorithm("cnf_latent_only", *args, timeout=timeout)


TINY_FLAGS = TINY_FLOW_RUN_FLAGS


def test_end_to_end_run_writes_what_it_promises(tmp_path, tiny_hdf5):
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "run",
                      *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert proc.stdout.strip().splitlines()[-1].endswith(str(run / "results.json"))
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "cnf_latent_only"
    assert [e["step"] for e in results["evaluations"]] == [20, 40]
    assert 0.0 <= results["latent_edge_fraction"] <= 1.0 and np.isfinite(results["flow_best_valid_nll"])
    assert (run / "config.yaml").read_text().count("flow_layers: 2") == 1
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 40
    flow = torch.load(run / "flow.pt", weights_only=True)
    assert flow["sizes"]["action_dim"] == 3  # odd action dimension, no padding
    # --flow_checkpoint skips phase 1; a Normal-latent flow (cnf_normal_ablation.py) is refused
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "reuse",
                      "--flow_checkpoint", str(run / "flow.pt"), *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert "flow/valid_nll" not in (tmp_path / "reuse" / "metrics.jsonl").read_text()
    torch.save({**flow, "base_distribution": "normal"}, tmp_path / "normal.pt")
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "normal",
                      "--flow_checkpoint", str(tmp_path / "normal.pt"), *TINY_FLAGS)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert all(word in errors[0] for word in ("--flow_checkpoint", "normal.pt", "normal latent", "uniform")), errors
    assert not (tmp_path / "normal" / "results.json").exists()


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         train_steps=60, eval_every=20, eval_episodes=2, flow_steps=40, flow_eval_every=10)
    full = json.loads(lo.train(replace(config, run_name="full")).read_text())
    full_actor = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["agent"]["actor"]

    resumed = interrupted_then_resumed(lo, lo.LatentOnlyCNF, config, monkeypatch)
    assert [e["step"] for e in resumed["evaluations"]] == [20, 40, 60]
    assert resumed["evaluations"] == full["evaluations"]
    assert resumed["latent_edge_fraction"] == full["latent_edge_fraction"]
    resumed_actor = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["agent"]["actor"]
    assert all(torch.equal(full_actor[k], resumed_actor[k]) for k in full_actor)


def test_quick_preset_loads():
    path = ROOT / "algorithms" / "configs" / "cnf_latent_only" / "quick.yaml"
    config = lo.parse_config(lo.TrainConfig, ["--config_path", str(path)])
    assert config.env == "halfcheetah-medium-gymv5"
    assert config.train_steps < lo.TrainConfig().train_steps and config.flow_steps < lo.TrainConfig().flow_steps
