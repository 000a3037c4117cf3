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
        flow.freeze()
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
    flow = random_flow(n, dtype=torch.float32).freeze()
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
    flow = cnf.pretrain_flow(tiny_config(), buffer, run, None)
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


BAD_INPUTS = {
    "unknown env": lambda tmp: ["--env", "no-such-dataset-v9"],
    "missing file": lambda tmp: ["--dataset_path", str(tmp / "missing.hdf5")],
    "corrupt file": lambda tmp: ["--dataset_path", str((tmp / "corrupt.hdf5").write_bytes(b"\x00garbage" * 512)
                                                       and tmp / "corrupt.hdf5")],
    "NaN rows": lambda tmp: ["--dataset_path",
                             _bad(tmp, "nan", lambda f: f["observations"].__setitem__((5, 2), np.nan))],
    "actions outside the box": lambda tmp: ["--dataset_path",
                                            _bad(tmp, "box", lambda f: f["actions"].__setitem__((7, 1), 1.5))],
    "mismatched dims": lambda tmp: ["--dataset_path", write_tiny_hdf5(tmp / "dims.hdf5", obs_dim=5)],
    "missing keys": lambda tmp: ["--dataset_path", _bad(tmp, "keys", lambda f: f.__delitem__("timeouts"))],
    "wrong row count": lambda tmp: ["--dataset_path", _bad(tmp, "rows", lambda f: (
        f.__delitem__("rewards"), f.create_dataset("rewards", data=np.zeros(10))))],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_error(tmp_path, case):
    proc = run_script(*BAD_INPUTS[case](tmp_path), "--checkpoints_path", str(tmp_path / "runs"), timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("results.json"))


def test_mixed_precision_decode_stays_close_and_critics_still_learn():
    """--amp: bfloat16 conditioner matmuls; decoded actions stay near the float32 ones."""
    flow = random_flow(3, dtype=torch.float32)
    amp_flow = cnf.ConditionalFlow(3, 4, 3, 16, amp=True)
    amp_flow.load_state_dict(flow.state_dict())
    latents, states = torch.rand(1024, 3) * 1.8 - 0.9, torch.randn(1024, 4)
    exact = flow.freeze().decode(latents, states)
    assert (amp_flow.freeze().decode(latents, states) - exact).abs().max() < 2e-2
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
