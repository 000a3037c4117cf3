"""algorithms/cnf.py: the flow's mathematics, both training phases, the run loop, and bad input."""
import copy
import json
import time
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

import cnf
import conftest
from conftest import (ROOT, TINY_FLOW_RUN_FLAGS, assert_frozen_decode_matches_unfrozen,
                      assert_pretraining_decreases_validation_nll, density_integral, interrupted_then_resumed,
                      run_algorithm, script_critic, tiny_flow_config, toy_conditional_data, write_tiny_hdf5)


def random_flow(action_dim, **kwargs):
    return conftest.random_flow(cnf.ConditionalFlow, action_dim, **kwargs)


# float64 checks the mathematics exactly; float32 (what training uses) loses resolution where a
# latent nears the box edge (1 - z is resolved to ~6e-8), hence the looser tolerance.
@pytest.mark.parametrize("n", [1, 2, 3, 6])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_decode_inverts_encode(n, frozen, dtype, atol):
    flow = random_flow(n, dtype=dtype)
    if frozen:
        flow = cnf.FrozenFlow(flow)
    actions = torch.rand(4096, n, dtype=dtype) * 1.98 - 0.99
    states = torch.randn(4096, 4, dtype=dtype)
    latents, _ = flow.encode(actions, states)
    assert (latents.abs() < 1 - cnf.ACTION_EPS).all()  # inside the box, not clamped on the way back
    assert (flow.decode(latents, states) - actions).abs().max() < atol


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_log_det_matches_autograd_jacobian(n):
    flow = random_flow(n)
    state = torch.randn(1, 4, dtype=torch.float64)
    for _ in range(3):
        action = torch.rand(1, n, dtype=torch.float64) * 1.8 - 0.9
        jacobian = torch.autograd.functional.jacobian(lambda a: flow.encode(a[None], state)[0][0], action[0])
        _, log_det = flow.encode(action, state)
        assert torch.allclose(log_det[0], torch.linalg.slogdet(jacobian).logabsdet, atol=1e-8)


def test_density_integrates_to_one_1d():
    flow = random_flow(1)
    for state in torch.randn(3, 4, dtype=torch.float64):
        assert abs(density_integral(flow, state, 200_001) - 1.0) < 0.02


def test_density_integrates_to_one_2d():
    total = density_integral(random_flow(2), torch.randn(4, dtype=torch.float64), 1201)
    assert abs(total - 1.0) < 0.02


@pytest.mark.parametrize("n", [1, 3, 6])
def test_every_latent_in_the_box_decodes_inside_the_action_box(n):
    flow = cnf.FrozenFlow(random_flow(n, dtype=torch.float32))
    corners = torch.tensor(np.array(np.meshgrid(*[[-1.0, 1.0]] * n)).reshape(n, -1).T, dtype=torch.float32)
    latents = torch.cat([torch.rand(4096, n) * 2 - 1, corners])
    actions = flow.decode(latents, torch.randn(len(latents), 4) * 3)
    assert torch.isfinite(actions).all() and (actions.abs() < 1).all()


def test_actnorm_initialisation_standardises_its_input():
    layer = cnf.ActNorm(5)
    x = torch.randn(1000, 5) * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5]) + torch.tensor([4.0, -2.0, 0.0, 1.0, 7.0])
    layer.initialize(x)
    y, _ = layer.encode(x, None)
    assert torch.allclose(y.mean(0), torch.zeros(5), atol=1e-4)
    assert torch.allclose(y.std(0), torch.ones(5), atol=1e-3)


def test_frozen_flow_gets_no_gradient_and_matches_unfrozen_decode():
    latents, states = torch.rand(64, 3) * 2 - 1, torch.randn(64, 4)
    assert_frozen_decode_matches_unfrozen(random_flow(3, dtype=torch.float32), latents, states)


def tiny_config(**overrides):
    return tiny_flow_config(cnf.TrainConfig, **overrides)


def test_pretraining_decreases_validation_nll():
    torch.manual_seed(0)
    flow = cnf.ConditionalFlow(2, 3, 2, 32)
    assert_pretraining_decreases_validation_nll(flow, cnf.FlowPretrainer, tiny_config())


class _Logger:
    def __init__(self):
        self.rows = []

    def log(self, metrics, step, phase="rl"):
        self.rows.append({"step": step, "phase": phase, **metrics})


def test_pretraining_keeps_the_best_validation_flow(tmp_path, monkeypatch):
    actions, states = toy_conditional_data(2000)
    data = cnf.OfflineData("toy", states.numpy(), actions.numpy(), np.zeros(2000, np.float32), states.numpy(),
                           np.zeros(2000, np.float32), None, None)
    buffer = cnf.ReplayBuffer(data, "cpu")
    scripted, seen = iter([3.0, 1.0, 2.0, 2.5]), []

    def scripted_validation(self, *_):
        seen.append(copy.deepcopy(self.flow.state_dict()))
        return next(scripted)

    monkeypatch.setattr(cnf.FlowPretrainer, "validation_nll", scripted_validation)
    run = cnf.Run(tiny_config(), data, tmp_path, None, _Logger(), time.time())
    flow = cnf.pretrain_flow(tiny_config(), buffer, run)
    kept = flow.state_dict()
    assert [(row["phase"], row["step"]) for row in run.logger.rows] == [("flow", 50), ("flow", 100), ("flow", 150),
                                                                        ("flow", 200)]
    assert all(torch.equal(kept[k], seen[1][k]) for k in kept)  # the step whose validation NLL was 1.0
    assert not all(torch.equal(kept[k], seen[-1][k]) for k in kept)
    saved = torch.load(tmp_path / "flow.pt", weights_only=True)
    assert saved["best_valid_nll"] == 1.0 and all(torch.equal(saved["flow"][k], kept[k]) for k in kept)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # the run's phase-1 checkpoint
    assert (checkpoint["phase"], checkpoint["step"], checkpoint["best_valid_nll"]) == ("flow", 200, 1.0)


def test_critics_learn_a_known_value():
    """Every transition terminal with reward 1: both critics must approach Q = 1."""
    torch.manual_seed(0)
    flow = random_flow(3, dtype=torch.float32)
    agent = cnf.CNF(flow, 4, 3, tiny_config(critic_lr=1e-3))
    states, actions = torch.randn(256, 4), torch.rand(256, 3) * 1.8 - 0.9
    batch = (states, actions, torch.ones(256, 1), torch.randn(256, 4), torch.ones(256, 1))
    first = agent.train(batch)["critic_loss"].item()
    for _ in range(300):
        last = agent.train(batch)
    assert last["critic_loss"].item() < 0.05 * first
    assert (agent.critic(states, actions) - 1.0).abs().mean() < 0.05


def test_policy_moves_toward_high_advantage_actions():
    """With a critic that prefers one data action, the decoded policy action approaches it."""
    torch.manual_seed(0)
    flow = random_flow(2, dtype=torch.float32)
    agent = cnf.CNF(flow, 4, 2, tiny_config(actor_lr=3e-3))
    target = torch.tensor([0.6, -0.4])
    script_critic(agent, lambda a: -((a - target) ** 2).sum(-1, keepdim=True))
    states = torch.randn(128, 4)
    actions = torch.cat([target.expand(64, 2), torch.rand(64, 2) * 1.8 - 0.9])
    batch = (states, actions, torch.zeros(128, 1), states, torch.ones(128, 1))
    before = (agent.act(states) - target).abs().mean()
    for _ in range(300):
        agent.train(batch)
    after = (agent.act(states) - target).abs().mean()
    assert after < 0.5 * before


# ---- one phase-2 update recomputed by hand (Eqs. 6-8 and the Polyak step) ----------------------------
TOL = dict(rtol=1e-5, atol=1e-5)
DONES = {"none": [0.0] * 16, "mixed": [0.0, 1.0, 1.0, 0.0] * 4}


def phase2_agent(**overrides):
    """A tiny CNF agent (2-dim actions, 3-dim states, a random 2-block flow) whose target critics differ from
    its critics, and a batch of 16 transitions with rewards of both signs."""
    flow = conftest.random_flow(cnf.ConditionalFlow, 2, state_dim=3, n_blocks=2, hidden=8, dtype=torch.float32)
    torch.manual_seed(1)
    fields = dict(hidden_dim=16, n_layers=3, critic_lr=1e-2, actor_lr=1e-2, gamma=0.9, tau=0.25,
                  awac_lambda=0.02, exp_adv_max=2.0)
    agent = cnf.CNF(flow, 3, 2, tiny_config(**{**fields, **overrides}))
    with torch.no_grad():  # y must come from the target critics, not the critics
        for p in agent.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    states, actions = torch.randn(16, 3, generator=g), torch.rand(16, 2, generator=g) * 1.8 - 0.9
    rewards, next_states = torch.randn(16, 1, generator=g), torch.randn(16, 3, generator=g)
    return agent, (states, actions, rewards, next_states, torch.zeros(16, 1))


def update_by_hand(actor, critic, target_critic, flow, config, batch, seed):
    """One step of Algorithm 2 on copies of the networks, written out from the paper's equations. CNF.train
    draws z' ~ pi(. | s') (for the target) and then z ~ pi(. | s) (for the policy), one randn each."""
    states, actions, rewards, next_states, dones = batch
    torch.manual_seed(seed)
    noise_next, noise = torch.randn(actions.shape), torch.randn(actions.shape)

    def sample(s, eps):  # tanh-Gaussian latent, reparameterised
        mean, log_std = actor.mean_log_std(s)
        return torch.tanh(mean + log_std.exp() * eps)

    # Eq. 6: y = r + gamma (1 - d) min(Q1', Q2')(s', f^-1(z' | s')); loss = MSE(Q1, y) + MSE(Q2, y)
    with torch.no_grad():
        target_1, target_2 = target_critic(next_states, flow.decode(sample(next_states, noise_next), next_states))
        y = rewards + config.gamma * (1.0 - dones) * torch.minimum(target_1, target_2)
    q1, q2 = critic(states, actions)
    critic_loss = torch.nn.functional.mse_loss(q1, y) + torch.nn.functional.mse_loss(q2, y)
    q_mean = (q1.mean() + q2.mean()) / 2
    optimizer = torch.optim.Adam(critic.parameters(), lr=config.critic_lr)
    optimizer.zero_grad()
    critic_loss.backward()
    optimizer.step()
    # Eq. 7: w = min(exp((Q(s, a) - Q(s, f^-1(z | s))) / lambda), exp_adv_max), Q = min of the UPDATED critics
    policy_actions = flow.decode(sample(states, noise), states)
    with torch.no_grad():
        advantage = torch.minimum(*critic(states, actions)) - torch.minimum(*critic(states, policy_actions))
        raw = torch.exp(advantage / config.awac_lambda)
        weights = raw.clamp(max=config.exp_adv_max)
    # Eq. 8: the weighted L1 distance between the data's actions and the decoded policy actions
    actor_loss = (weights * (actions - policy_actions).abs()).mean()
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.actor_lr)
    optimizer.zero_grad()
    actor_loss.backward()
    optimizer.step()
    # Polyak: target <- (1 - tau) target + tau critic
    with torch.no_grad():
        polyak = [(1 - config.tau) * t + config.tau * c
                  for t, c in zip(target_critic.parameters(), critic.parameters(), strict=True)]
    metrics = {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "q_mean": q_mean.detach(),
               "adv_weight_mean": weights.mean()}
    return metrics, advantage, raw, polyak


def train_and_recompute(agent, batch, seed=5):
    copies = [copy.deepcopy(m) for m in (agent.actor, agent.critic, agent.target_critic)]
    old_target = [p.detach().clone() for p in agent.target_critic.parameters()]
    torch.manual_seed(seed)
    out = agent.train(batch)
    expected, advantage, raw, polyak = update_by_hand(*copies, agent.flow, agent.config, batch, seed)
    return out, expected, advantage, raw, polyak, copies, old_target


@pytest.mark.parametrize("dones", sorted(DONES))
def test_one_update_matches_the_equations_by_hand(dones):
    """CNF.train against Eqs. 6-8 written out: its losses, Q mean and mean weight, the critics and policy after
    one Adam step each, and the target critics after the Polyak step, with non-terminal (gamma (1 - d) Q'
    counts) and mixed transitions, and an advantage clamp that binds for some samples only."""
    agent, batch = phase2_agent()
    batch = (*batch[:4], torch.tensor(DONES[dones]).unsqueeze(-1))
    out, expected, _, raw, polyak, (actor, critic, _), old_target = train_and_recompute(agent, batch)
    clamped = raw > agent.config.exp_adv_max
    assert clamped.any() and not clamped.all(), raw.flatten()  # the clamp binds for some samples, not all
    assert set(out) >= set(expected)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], **TOL, msg=key)
    for mine, theirs in [(critic, agent.critic), (actor, agent.actor)]:
        for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(q, p, **TOL)
    tau = agent.config.tau  # the target step exactly, from the agent's own updated critics
    for t, old, c, hand in zip(agent.target_critic.parameters(), old_target, agent.critic.parameters(), polyak,
                               strict=True):
        torch.testing.assert_close(t, (1 - tau) * old + tau * c, rtol=0, atol=1e-6)
        torch.testing.assert_close(t, hand, **TOL)
        assert not torch.allclose(t, old, rtol=0, atol=1e-4) and not torch.allclose(t, c, rtol=0, atol=1e-4)


def test_awac_lambda_sets_how_sharply_the_advantage_weights_select():
    """exp(A / lambda): a large lambda gives every sample weight 1 (behaviour cloning); a small one gives
    exp_adv_max to the samples with A > 0 and ~0 to the rest; in between, exactly exp(A / lambda)."""
    means = {}
    for awac_lambda, exp_adv_max in [(1e6, 100.0), (0.5, 100.0), (0.05, 100.0), (1e-6, 3.0)]:
        agent, batch = phase2_agent(awac_lambda=awac_lambda, exp_adv_max=exp_adv_max)
        out, expected, advantage, raw, *_ = train_and_recompute(agent, batch)
        torch.testing.assert_close(out["adv_weight_mean"], expected["adv_weight_mean"], **TOL)
        torch.testing.assert_close(out["actor_loss"], expected["actor_loss"], **TOL)
        means[awac_lambda] = out["adv_weight_mean"].item()
        if awac_lambda == 0.05:
            assert (raw < exp_adv_max).all()  # no clamp: exp(A / lambda) itself
    assert means[1e6] == pytest.approx(1.0, abs=1e-5)
    assert means[1e-6] == pytest.approx(3.0 * (advantage > 0).float().mean().item(), abs=1e-5)
    assert 0 < (advantage > 0).float().mean() < 1
    assert abs(means[0.5] - means[0.05]) > 0.05  # lambda changes the weights far beyond the tolerance


def test_latent_policy_samples_stay_in_the_box_and_acts_with_tanh_of_its_mean():
    torch.manual_seed(0)
    policy = cnf.LatentPolicy(4, 3, 32, 3)
    states = torch.randn(4096, 4) * 2
    with torch.no_grad():
        samples = policy(states)
        mean, log_std = policy.mean_log_std(states)
        torch.testing.assert_close(policy.deterministic(states), torch.tanh(mean), rtol=0, atol=0)
    assert samples.shape == (4096, 3) and (samples.abs() < 1).all()
    assert (samples.abs() > 0.9).any()  # a Gaussian without the tanh would leave the box here
    assert not torch.allclose(samples, torch.tanh(mean), atol=1e-2)  # a sample, not the mean


def test_latent_policy_clamps_its_log_std_to_minus_20_and_2():
    """Raw log-std outputs of 50, -50 and 0.5: the policy uses 2, -20 and 0.5."""
    torch.manual_seed(0)
    policy = cnf.LatentPolicy(4, 3, 32, 3)
    last = [m for m in policy.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.3, 0.0, 50.0, -50.0, 0.5]))  # (mean, raw log-std)
    states = torch.randn(20_000, 4)
    with torch.no_grad():
        mean, log_std = policy.mean_log_std(states)
        samples = policy(states)
    torch.testing.assert_close(log_std, torch.tensor([2.0, -20.0, 0.5]).expand(20_000, 3), rtol=0, atol=0)
    torch.testing.assert_close(mean, torch.tensor([0.0, 0.3, 0.0]).expand(20_000, 3), rtol=0, atol=0)
    # sigma = e^2: P(|N(0, e^2)| > 1) = P(|N(0, 1)| > e^-2) = 0.892, so |tanh(.)| > tanh(1) that often
    assert abs((samples[:, 0].abs() > np.tanh(1.0)).float().mean().item() - 0.892) < 0.02
    assert torch.allclose(samples[:, 1], torch.tanh(torch.tensor(0.3)), rtol=0, atol=1e-6)  # sigma = e^-20
    assert abs(torch.atanh(samples[:, 2]).std().item() - np.exp(0.5)) < 0.05


def test_qlearning_conversion_terminal_and_timeout_endings():
    # Episode A: 3 steps ending by termination; episode B: 3 steps ending by timeout; C: 2 steps, cut by the file end.
    obs = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    raw = {"observations": obs, "actions": np.zeros((8, 1), np.float32), "rewards": np.arange(8, dtype=np.float32),
           "terminals": np.array([0, 0, 1, 0, 0, 0, 0, 0], bool), "timeouts": np.array([0, 0, 0, 0, 0, 1, 0, 0], bool)}
    out = cnf.qlearning_dataset(raw)
    np.testing.assert_array_equal(out["rewards"], [0, 1, 2, 3, 4, 6])  # row 5 (timeout) and row 7 (last) dropped
    np.testing.assert_array_equal(out["dones"], [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["next_observations"][:, 0], [1, 2, 3, 4, 5, 7])


def run_script(*args, timeout=600):
    return run_algorithm("cnf", *args, timeout=timeout)


TINY_FLAGS = TINY_FLOW_RUN_FLAGS


def test_end_to_end_run_writes_what_it_promises(tmp_path, tiny_hdf5):
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "run",
                      *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert proc.stdout.strip().splitlines()[-1].endswith(str(run / "results.json"))
    results = json.loads((run / "results.json").read_text())
    assert [e["step"] for e in results["evaluations"]] == [20, 40]
    assert results["final_normalized_score"] == results["evaluations"][-1]["normalized_score"]
    assert np.isfinite(results["flow_best_valid_nll"])
    assert (run / "config.yaml").read_text().count("flow_layers: 2") == 1
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 40
    flow = torch.load(run / "flow.pt", weights_only=True)
    assert flow["sizes"]["action_dim"] == 3  # odd action dimension, no padding
    # --flow_checkpoint skips phase 1
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "reuse",
                      "--flow_checkpoint", str(run / "flow.pt"), *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert "flow/valid_nll" not in (tmp_path / "reuse" / "metrics.jsonl").read_text()


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         train_steps=60, eval_every=20, eval_episodes=2, flow_steps=40, flow_eval_every=10)
    full = json.loads(cnf.train(replace(config, run_name="full")).read_text())
    full_actor = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["agent"]["actor"]

    resumed = interrupted_then_resumed(cnf, cnf.CNF, config, monkeypatch)
    assert [e["step"] for e in resumed["evaluations"]] == [20, 40, 60]
    assert resumed["evaluations"] == full["evaluations"]
    resumed_actor = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["agent"]["actor"]
    assert all(torch.equal(full_actor[k], resumed_actor[k]) for k in full_actor)


def _bad(tmp_path, name, mutate):
    path = write_tiny_hdf5(tmp_path / f"{name}.hdf5")
    with h5py.File(path, "r+") as f:
        mutate(f)
    return path


# case -> (flags, words the one `error:` line must contain: the setting or file, and the cause)
BAD_INPUTS = {
    "unknown env": (lambda tmp: ["--env", "no-such-dataset-v9"], ["--env", "no-such-dataset-v9"]),
    "missing file": (lambda tmp: ["--dataset_path", str(tmp / "missing.hdf5")],
                     ["--dataset_path", "missing.hdf5", "does not exist"]),
    "corrupt file": (lambda tmp: ["--dataset_path", str((tmp / "corrupt.hdf5").write_bytes(b"\x00garbage" * 512)
                                                        and tmp / "corrupt.hdf5")], ["corrupt.hdf5", "HDF5"]),
    "NaN rows": (lambda tmp: ["--dataset_path",
                              _bad(tmp, "nan", lambda f: f["observations"].__setitem__((5, 2), np.nan))],
                 ["nan.hdf5", "observations", "NaN"]),
    "actions outside the box": (lambda tmp: ["--dataset_path",
                                             _bad(tmp, "box", lambda f: f["actions"].__setitem__((7, 1), 1.5))],
                                ["box.hdf5", "actions", "[-1, 1]", "1.5"]),
    "mismatched dims": (lambda tmp: ["--dataset_path", write_tiny_hdf5(tmp / "dims.hdf5", obs_dim=5)],
                        ["5-dim observations", "--eval_env"]),
    "missing keys": (lambda tmp: ["--dataset_path", _bad(tmp, "keys", lambda f: f.__delitem__("timeouts"))],
                     ["keys.hdf5", "timeouts"]),
    "wrong row count": (lambda tmp: ["--dataset_path", _bad(tmp, "rows", lambda f: (
        f.__delitem__("rewards"), f.create_dataset("rewards", data=np.zeros(10))))], ["rows.hdf5", "rewards", "10"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_error(tmp_path, case):
    """One `error:` line that names the setting or file and what is wrong with it; no traceback, no results."""
    flags, words = BAD_INPUTS[case]
    proc = run_script(*flags(tmp_path), "--checkpoints_path", str(tmp_path / "runs"), timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert all(word in lines[0] for word in words), (words, lines[0])
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("results.json"))


def test_mixed_precision_decode_stays_close_and_critics_still_learn():
    """--amp: bfloat16 conditioner matmuls; decoded actions stay near the float32 ones."""
    flow = random_flow(3, dtype=torch.float32)
    amp_flow = cnf.ConditionalFlow(3, 4, 3, 16, amp=True)
    amp_flow.load_state_dict(flow.state_dict())
    latents, states = torch.rand(1024, 3) * 1.8 - 0.9, torch.randn(1024, 4)
    exact = cnf.FrozenFlow(flow).decode(latents, states)
    assert (cnf.FrozenFlow(amp_flow).decode(latents, states) - exact).abs().max() < 2e-2
    torch.manual_seed(0)
    agent = cnf.CNF(amp_flow, 4, 3, tiny_config(critic_lr=1e-3, amp=True))
    batch = (states[:256], exact[:256], torch.ones(256, 1), torch.randn(256, 4), torch.ones(256, 1))
    first = agent.train(batch)["critic_loss"].item()
    for _ in range(300):
        last = agent.train(batch)
    assert last["critic_loss"].item() < 0.05 * first


def test_yaml_config_loads_and_flags_override_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("flow_layers: 5\nawac_lambda: 0.1\nenv: hopper-medium-v2\n")
    config = cnf.parse_config(cnf.TrainConfig, ["--config_path", str(path), "--awac_lambda", "0.5"])
    assert (config.flow_layers, config.awac_lambda, config.env) == (5, 0.5, "hopper-medium-v2")
    quick = cnf.parse_config(cnf.TrainConfig, ["--config_path", str(ROOT / "algorithms/configs/cnf/quick.yaml")])
    assert quick.env == "halfcheetah-medium-gymv5" and quick.train_steps < cnf.TrainConfig().train_steps
