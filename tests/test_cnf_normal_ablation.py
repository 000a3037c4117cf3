"""algorithms/cnf_normal_ablation.py: the Normal-latent flow's mathematics, the unbounded (Fig. 5)
and clipped (Fig. 6) latent policies, phase-1 NLL logging (Fig. 8), the run loop and bad input."""
import json
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

import cnf
import cnf_normal_ablation as nab
import conftest
from conftest import (ROOT, TINY_FLOW_RUN_FLAGS, assert_frozen_decode_matches_unfrozen,
                      assert_pretraining_decreases_validation_nll, density_integral, interrupted_then_resumed,
                      run_algorithm, script_critic, tiny_flow_config)


def random_flow(action_dim, **kwargs):
    return conftest.random_flow(nab.NormalConditionalFlow, action_dim, **kwargs)


# ---- the Normal-latent flow ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 6])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_decode_inverts_encode(n, frozen, dtype, atol):
    flow = random_flow(n, dtype=dtype)
    if frozen:
        flow = nab.FrozenFlow(flow)  # phase 2's decoder
    actions = torch.rand(4096, n, dtype=dtype) * 1.98 - 0.99
    states = torch.randn(4096, 4, dtype=dtype)
    latents, _ = flow.encode(actions, states)
    assert (latents.abs() > 1).any()  # no final tanh: the latents are not confined to the box
    assert (flow.decode(latents, states) - actions).abs().max() < atol


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_log_prob_is_normal_density_plus_autograd_log_det(n):
    """log p(a | s) = log N(f(a | s); 0, I) + log|det df/da|, the Jacobian taken by autograd."""
    flow = random_flow(n)
    state = torch.randn(1, 4, dtype=torch.float64)
    for _ in range(3):
        action = torch.rand(1, n, dtype=torch.float64) * 1.8 - 0.9
        jacobian = torch.autograd.functional.jacobian(lambda a: flow.encode(a[None], state)[0][0], action[0])
        latent = flow.encode(action, state)[0][0]
        normal = torch.distributions.Normal(torch.zeros(n, dtype=torch.float64), 1.0).log_prob(latent).sum()
        expected = normal + torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(flow.log_prob(action, state)[0], expected, atol=1e-8)


def test_density_integrates_to_one_over_the_action_interval_1d():
    """After the atanh layer the density lives on (-1, 1): its integral there is 1 for every state."""
    flow = random_flow(1)
    for state in torch.randn(3, 4, dtype=torch.float64):
        total = density_integral(flow, state, 20_001)
        assert abs(total - 1.0) < 1e-3, total


def test_density_integrates_to_one_2d():
    total = density_integral(random_flow(2), torch.randn(4, dtype=torch.float64), 401)
    assert abs(total - 1.0) < 5e-3, total


def test_far_latents_decode_to_the_edge_of_the_action_box():
    """The mechanism behind Fig. 5: every latent decodes inside (-1, 1)^n, but latents far from
    N(0, I)'s bulk land at the box's edge, where the data has (almost) no actions."""
    flow = nab.FrozenFlow(random_flow(3, dtype=torch.float32))
    states = torch.randn(4096, 4)
    near = flow.decode(torch.randn(4096, 3), states)
    far = flow.decode(torch.randn(4096, 3) * 1e3, states)
    for actions in (near, far):
        assert torch.isfinite(actions).all() and (actions.abs() < 1).all()
    assert (near.abs().max(-1).values > 0.999).float().mean() < 0.05
    assert (far.abs().max(-1).values > 0.999).all()


def test_frozen_flow_gets_no_gradient_and_matches_unfrozen_decode():
    latents, states = torch.randn(64, 3) * 3, torch.randn(64, 4)
    assert_frozen_decode_matches_unfrozen(random_flow(3, dtype=torch.float32), latents, states)


def tiny_config(**overrides):
    return tiny_flow_config(nab.TrainConfig, **overrides)


def test_pretraining_decreases_validation_nll():
    torch.manual_seed(0)
    flow = nab.NormalConditionalFlow(2, 3, 2, 32)
    assert_pretraining_decreases_validation_nll(flow, nab.FlowPretrainer, tiny_config())


# ---- the latent policy: unbounded (Fig. 5) or a * tanh (Fig. 6) -------------------------------------
def wide_policy(latent_clip, mean=0.0, state_dim=4, latent_dim=3):
    """A policy whose latent Gaussian is as wide as the log-std clamp allows (sigma = e^2), at `mean`."""
    policy = nab.LatentPolicy(state_dim, latent_dim, 32, 3, latent_clip=latent_clip)
    with torch.no_grad():
        last = policy.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.cat([torch.full((latent_dim,), mean), torch.full((latent_dim,), 5.0)]))  # log-std -> 2
    return policy


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0, 3.0])
def test_clipped_policy_samples_fill_but_never_leave_the_box(a):
    torch.manual_seed(0)
    states = torch.randn(20_000, 4)
    for mean in (0.0, 40.0):
        policy = wide_policy(a, mean)
        latents = torch.cat([policy(states), policy.deterministic(states)])
        # a tanh(x) is in the open box a (-1, 1)^n; float32 rounds tanh to exactly 1 for |x| > ~9
        assert (latents.abs() <= a).all()
        assert latents.abs().max() > 0.999 * a


def test_unclipped_policy_samples_are_unbounded():
    torch.manual_seed(0)
    states = torch.randn(20_000, 4)
    latents = wide_policy(0.0)(states)
    assert latents.abs().max() > 20.0  # beyond any latent clip a of Fig. 6
    assert (latents.abs() > 10.0).float().mean() > 0.1  # sigma = e^2: not a rare event
    far = wide_policy(0.0, mean=40.0)
    assert (far.deterministic(states) == 40.0).all()  # acting uses mu itself, unsquashed


def record_decoded_latents(agent):
    """Wrap the agent's flow.decode so that every latent reaching f^-1 is kept."""
    seen, decode = [], agent.flow.decode

    def recording_decode(latents, states):
        seen.append(latents.detach().clone())
        return decode(latents, states)

    agent.flow.decode = recording_decode
    return seen


@pytest.mark.parametrize("latent_clip", [0.0, 1.0, 2.5])
def test_what_reaches_the_decoder_during_updates_and_acting(latent_clip):
    torch.manual_seed(0)
    agent = nab.NormalLatentCNF(random_flow(3, dtype=torch.float32), 4, 3, tiny_config(latent_clip=latent_clip))
    agent.actor = wide_policy(latent_clip)
    agent.actor_optimizer = torch.optim.Adam(agent.actor.parameters(), lr=3e-4)
    seen = record_decoded_latents(agent)
    states, actions = torch.randn(256, 4), torch.rand(256, 3) * 1.8 - 0.9
    batch = (states, actions, torch.randn(256, 1), torch.randn(256, 4), torch.zeros(256, 1))
    for _ in range(5):
        agent.train(batch)
    agent.act(torch.randn(256, 4) * 3)
    assert len(seen) == 11  # two decodes per update (s' for the target, s for the policy), one to act
    latents = torch.cat(seen)
    if latent_clip > 0:
        assert (latents.abs() <= latent_clip).all()
    else:
        assert latents.abs().max() > 20.0


def test_policy_moves_toward_high_advantage_actions():
    """With a critic that prefers one data action, the decoded policy action approaches it (clipped a = 2)."""
    torch.manual_seed(0)
    flow = random_flow(2, dtype=torch.float32)
    agent = nab.NormalLatentCNF(flow, 4, 2, tiny_config(actor_lr=3e-3, latent_clip=2.0))
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


# ---- the run loop ----------------------------------------------------------------------------------
def run_script(*args, timeout=600):
    return run_algorithm("cnf_normal_ablation", *args, timeout=timeout)


TINY_FLAGS = TINY_FLOW_RUN_FLAGS


def one_error_line(proc):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_end_to_end_runs_write_what_they_promise(tmp_path, tiny_hdf5):
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "fig5",
                      *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "fig5"
    assert proc.stdout.strip().splitlines()[-1].endswith(str(run / "results.json"))
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "cnf_normal_ablation" and results["latent_clip"] == 0.0
    assert [e["step"] for e in results["evaluations"]] == [20, 40]
    assert np.isfinite(results["flow_best_valid_nll"])
    # Fig. 8: the same phase-1 keys and schedule as cnf.py
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    flow_rows = [r for r in rows if "flow/valid_nll" in r]
    assert [r["step"] for r in flow_rows] == [10, 20] and all(np.isfinite(r["flow/train_nll"]) for r in flow_rows)
    assert results["flow_best_valid_nll"] == min(r["flow/valid_nll"] for r in flow_rows)
    flow = torch.load(run / "flow.pt", weights_only=True)
    assert flow["base_distribution"] == "normal" and flow["sizes"]["action_dim"] == 3  # odd, no padding
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 40
    # Fig. 6: a clipped policy on the same flow; phase 1 is skipped
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "fig6",
                      "--flow_checkpoint", str(run / "flow.pt"), "--latent_clip", "2", *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "fig6" / "results.json").read_text())["latent_clip"] == 2.0
    assert "flow/valid_nll" not in (tmp_path / "fig6" / "metrics.jsonl").read_text()
    assert (tmp_path / "fig6" / "config.yaml").read_text().count("latent_clip: 2.0") == 1


def test_a_uniform_flow_or_a_negative_clip_is_refused(tmp_path, tiny_hdf5):
    uniform = cnf.ConditionalFlow(3, 11, 2, 32)  # cnf.py's flow.pt: same parameter names, other density
    torch.save({"flow": uniform.state_dict(), "sizes": uniform.describe(), "best_valid_nll": 0.0,
                "base_distribution": "uniform", "state_mean": torch.zeros(11), "state_std": torch.ones(11)},
               tmp_path / "uniform.pt")
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path / "runs"),
                      "--flow_checkpoint", str(tmp_path / "uniform.pt"), *TINY_FLAGS)
    assert "uniform latent" in one_error_line(proc)
    proc = run_script("--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path / "runs"), "--latent_clip=-1")
    assert "--latent_clip" in one_error_line(proc)
    assert not list((tmp_path / "runs").rglob("results.json"))


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled", latent_clip=2.0,
                         train_steps=60, eval_every=20, eval_episodes=2, flow_steps=40, flow_eval_every=10)
    full = json.loads(nab.train(replace(config, run_name="full")).read_text())
    full_actor = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["agent"]["actor"]

    resumed = interrupted_then_resumed(nab, nab.NormalLatentCNF, config, monkeypatch)
    assert [e["step"] for e in resumed["evaluations"]] == [20, 40, 60]
    assert resumed["evaluations"] == full["evaluations"]
    resumed_actor = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["agent"]["actor"]
    assert all(torch.equal(full_actor[k], resumed_actor[k]) for k in full_actor)


@pytest.mark.parametrize("preset, latent_clip", [("quick.yaml", 0.0), ("quick_clip2.yaml", 2.0)])
def test_quick_presets_load(preset, latent_clip):
    path = ROOT / "algorithms" / "configs" / "cnf_normal_ablation" / preset
    config = nab.parse_config(nab.TrainConfig, ["--config_path", str(path)])
    assert config.env == "halfcheetah-medium-gymv5" and config.latent_clip == latent_clip
    assert config.train_steps < nab.TrainConfig().train_steps and config.flow_steps < nab.TrainConfig().flow_steps


@pytest.mark.parametrize("preset", ["quick.yaml", "medium.yaml"])
def test_presets_are_cnfs_but_for_the_latent(preset):
    """Fig. 5 compares runs that differ only in the latent space: every field the two scripts share is set as
    cnf.py's preset of the same name sets it."""
    configs = ROOT / "algorithms" / "configs"
    ours = nab.parse_config(nab.TrainConfig, ["--config_path", str(configs / "cnf_normal_ablation" / preset)])
    theirs = cnf.parse_config(cnf.TrainConfig, ["--config_path", str(configs / "cnf" / preset)])
    shared = ({f.name for f in fields(ours)} & {f.name for f in fields(theirs)}) - {"config_path"}
    assert {name: getattr(ours, name) for name in shared} == {name: getattr(theirs, name) for name in shared}
    assert ours.latent_clip == 0.0
