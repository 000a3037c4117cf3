"""The behaviour-likelihood diagnostic (cnf.py's `BehaviourLikelihood`, logged by the flow scripts at every
evaluation) and algorithms/behavior_likelihood.py, which applies it to any finished run; report.py's figures."""
import importlib
import json
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import awac
import behavior_likelihood
import cnf
import report
from conftest import tiny_flow_config, toy_conditional_data, write_tiny_hdf5


@pytest.fixture(scope="module")
def toy_flow():
    """A flow fitted (2 blocks, 300 steps) to toy conditional data a | s, 2-dim actions inside (-1, 1)^2."""
    torch.manual_seed(0)
    actions, states = toy_conditional_data(6000)
    flow = cnf.ConditionalFlow(2, 3, 2, 32)
    flow.encode(actions[:512], states[:512], initialize=True)
    trainer = cnf.FlowPretrainer(flow, tiny_flow_config(cnf.TrainConfig, flow_lr=3e-3))
    for _ in range(300):
        idx = torch.randint(0, 4000, (256,))
        trainer.train(actions[idx], states[idx])
    return cnf.FrozenFlow(flow), actions, states


def replay(actions, chunk):
    """A policy that returns `actions` chunk by chunk, in the order `measure` visits the sample."""
    chunks = iter(actions.split(chunk))
    return lambda states: (next(chunks), None)


def test_the_data_own_actions_are_out_of_distribution_one_percent_of_the_time(toy_flow):
    flow, actions, states = toy_flow
    diagnostic = cnf.BehaviourLikelihood(flow, states[:4000], actions[:4000], seed=0, n_states=3000, chunk=1024)
    assert len(diagnostic.indices) == 3000 and len(set(diagnostic.indices.tolist())) == 3000
    own = diagnostic.measure(replay(diagnostic.actions, 1024))
    assert own["diag/ood_rate"].item() == pytest.approx(0.01, abs=0.001)  # the threshold is their 1st percentile
    assert own["diag/policy_nll"].item() == pytest.approx(own["diag/data_nll"].item(), abs=1e-5)
    assert "diag/latent_abs_max" not in own  # a policy without latents: no latent figures
    # fresh draws from the same conditional distribution, never seen by the fit: still about 1%
    fresh_actions, fresh_states = toy_conditional_data(5000, seed=7)
    with torch.no_grad():
        fresh_rate = (flow.log_prob(fresh_actions, fresh_states) < diagnostic.threshold).float().mean().item()
    assert 0.003 < fresh_rate < 0.03, fresh_rate


def test_uniform_actions_stray_far_more_than_the_data(toy_flow):
    flow, actions, states = toy_flow
    diagnostic = cnf.BehaviourLikelihood(flow, states, actions, seed=0, n_states=3000)
    generator = torch.Generator().manual_seed(0)
    uniform = diagnostic.measure(lambda s: (torch.rand(len(s), 2, generator=generator) * 2 - 1, None))
    assert uniform["diag/ood_rate"].item() > 0.5, uniform
    assert uniform["diag/policy_nll"].item() > diagnostic.data_nll.item() + 2.0


def test_a_policy_at_the_box_corners_is_flagged(toy_flow):
    flow, actions, states = toy_flow
    diagnostic = cnf.BehaviourLikelihood(flow, states, actions, seed=0, n_states=2000)
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    action_corners = diagnostic.measure(lambda s: (corners[torch.arange(len(s)) % 4], None))
    assert action_corners["diag/ood_rate"].item() > 0.95
    # latent corners: a latent policy pushed to the edge of the box decodes to the flow's far tails
    latent_corners = diagnostic.measure(lambda s: (flow.decode(corners[torch.arange(len(s)) % 4], s),
                                                   corners[torch.arange(len(s)) % 4]))
    assert latent_corners["diag/ood_rate"].item() > 0.95
    assert latent_corners["diag/latent_abs_max"].item() == 1.0
    counts = latent_corners["latent_counts"]  # [2, bins]: every latent in the box's first or last bin
    first, last = cnf.LATENT_EDGES.index(-1.0) + 1, cnf.LATENT_EDGES.index(1.0)
    assert counts.shape == (2, len(cnf.LATENT_EDGES) + 1)
    assert (counts[:, first] + counts[:, last] == 2000).all() and counts[:, first].tolist() == [1000, 1000]


def test_latent_histogram_bins():
    diagnostic = cnf.BehaviourLikelihood.__new__(cnf.BehaviourLikelihood)
    diagnostic.edges = torch.tensor(cnf.LATENT_EDGES)
    latents = torch.tensor([[-9.0], [-1.0], [-0.95], [0.0], [0.999], [1.0], [1.2], [4.0]])
    bins = diagnostic.histogram(latents)[0]
    edges = cnf.LATENT_EDGES
    want = {0: 1, edges.index(-1.0) + 1: 2, edges.index(0.0) + 1: 1, edges.index(1.0): 2, edges.index(1.0) + 1: 1,
            len(edges): 1}
    assert {i: c for i, c in enumerate(bins.tolist()) if c} == want


# ---- in the runs -------------------------------------------------------------------------------------
def tiny_run_config(tmp_path, **overrides):
    fields = dict(dataset_path=write_tiny_hdf5(tmp_path / "tiny.hdf5"), checkpoints_path=str(tmp_path),
                  wandb_mode="disabled", train_steps=60, eval_every=20, eval_episodes=2, flow_steps=40,
                  flow_eval_every=10)
    return tiny_flow_config(cnf.TrainConfig, **{**fields, **overrides})


def diag_lines(run_dir):
    """step -> the diag/* values of metrics.jsonl (the last line of a step wins, as after a resume)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "diag/ood_rate" in row:
            rows[row["step"]] = {k: v for k, v in row.items() if k.startswith("diag/")}
    return rows


def test_in_run_metric_is_identical_with_and_without_resume_and_leaves_training_alone(tmp_path, monkeypatch):
    config = tiny_run_config(tmp_path, checkpoint_every=30)  # evaluations at 20, 40, 60; checkpoints at 30, 60
    full = json.loads(cnf.train(replace(config, run_name="full")).read_text())
    full_dir = tmp_path / "full"
    assert sorted(diag_lines(full_dir)) == [20, 40, 60]
    histograms = [json.loads(line) for line in (full_dir / "latent_histograms.jsonl").read_text().splitlines()]
    assert [h["step"] for h in histograms] == [20, 40, 60]
    assert all(np.sum(h["counts"], axis=1).tolist() == [h["n_states"]] * 3 for h in histograms)

    calls, original = {"n": 0}, cnf.CNF.train

    def stop(self, batch):  # killed after the evaluation at 40, before the checkpoint at 60
        calls["n"] += 1
        if calls["n"] > 45:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(cnf.CNF, "train", stop)
    with pytest.raises(KeyboardInterrupt):
        cnf.train(replace(config, run_name="stopped"))
    stopped = tmp_path / "stopped"
    assert [json.loads(line)["step"] for line in (stopped / "latent_histograms.jsonl").read_text().splitlines()] == [
        20, 40]
    monkeypatch.setattr(cnf.CNF, "train", original)
    resumed = json.loads(cnf.train(replace(config, resume=str(stopped))).read_text())
    assert resumed["evaluations"] == full["evaluations"]
    assert diag_lines(stopped) == diag_lines(full_dir)
    assert (stopped / "latent_histograms.jsonl").read_text() == (full_dir / "latent_histograms.jsonl").read_text()

    # the same run without the diagnostic (never built, never called): bitwise the same scores and policy
    monkeypatch.setattr(cnf, "BehaviourLikelihood", lambda *args, **kwargs: SimpleNamespace(hook=lambda *a: None))
    without = json.loads(cnf.train(replace(config, run_name="without")).read_text())
    assert without["evaluations"] == full["evaluations"]
    actor = torch.load(full_dir / "checkpoint.pt", weights_only=True)["agent"]["actor"]
    actor_without = torch.load(tmp_path / "without" / "checkpoint.pt", weights_only=True)["agent"]["actor"]
    assert all(torch.equal(actor[k], actor_without[k]) for k in actor)
    assert not (tmp_path / "without" / "latent_histograms.jsonl").exists()


@pytest.mark.parametrize("script, overrides", [("cnf_normal_ablation", {"latent_clip": 0.0}),
                                               ("cnf_normal_ablation", {"latent_clip": 2.0}),
                                               ("cnf_latent_only", {})])
def test_the_flow_ablations_log_the_diagnostic(tmp_path, script, overrides):
    module = importlib.import_module(script)
    config = tiny_run_config(tmp_path, train_steps=20, flow_steps=10)
    shared = {k: v for k, v in asdict(config).items() if k in module.TrainConfig.__dataclass_fields__}  # no --seeds
    config = module.TrainConfig(**{**shared, **overrides, "run_name": "run"})
    module.train(config)
    [(step, diag)] = diag_lines(tmp_path / "run").items()
    [histogram] = [json.loads(line) for line in (tmp_path / "run" / "latent_histograms.jsonl").read_text().splitlines()]
    assert step == histogram["step"] == 20 and 0.0 <= diag["diag/ood_rate"] <= 1.0
    assert np.sum(histogram["counts"], axis=1).tolist() == [histogram["n_states"]] * 3
    if overrides.get("latent_clip"):
        assert diag["diag/latent_abs_max"] <= overrides["latent_clip"]


def test_the_tool_reproduces_the_in_run_figures_and_scores_other_policies(tmp_path, capsys):
    config = tiny_run_config(tmp_path, train_steps=40)
    cnf.train(replace(config, run_name="cnf"))
    awac.train(awac.TrainConfig(device="cpu", dataset_path=config.dataset_path, checkpoints_path=str(tmp_path),
                                run_name="awac", wandb_mode="disabled", train_steps=20, eval_every=20,
                                eval_episodes=1, batch_size=32, hidden_dim=32))
    out = tmp_path / "likelihood.json"
    flow = str(tmp_path / "cnf" / "flow.pt")
    results = behavior_likelihood.main([str(tmp_path / "cnf"), str(tmp_path / "awac"), "--flow", flow,
                                        "--out", str(out), "--episodes", "2"])
    in_run = diag_lines(tmp_path / "cnf")[40]
    by_algorithm = {r["algorithm"]: r for r in results}
    for name in ("policy_nll", "data_nll", "ood_rate", "latent_abs_max"):
        assert by_algorithm["cnf"][name] == pytest.approx(in_run[f"diag/{name}"], rel=1e-6, abs=1e-7)
    last_histogram = (tmp_path / "cnf" / "latent_histograms.jsonl").read_text().splitlines()[-1]
    assert by_algorithm["cnf"]["latent_counts"] == json.loads(last_histogram)["counts"]
    assert by_algorithm["awac"]["data_nll"] == by_algorithm["cnf"]["data_nll"]  # the same states, the same flow
    assert "latent_abs_max" not in by_algorithm["awac"] and by_algorithm["awac"]["final"]
    assert json.loads(out.read_text())["runs"] == json.loads(json.dumps(results))
    assert "| awac | tiny | 20 |" in capsys.readouterr().out
    # --episodes 2 with the run's seed replays the cnf run's final evaluation (eval_episodes 2), episode by episode
    final = json.loads((tmp_path / "cnf" / "results.json").read_text())["final_normalized_score"]
    assert np.mean(by_algorithm["cnf"]["episode_scores"]) == pytest.approx(final, rel=1e-6)
    for result in results:
        assert len(result["episode_lengths"]) == 2
        assert all(isinstance(n, int) and 1 <= n <= 1000 for n in result["episode_lengths"])  # Hopper-v5's limit


def test_the_tool_refuses_bad_input_with_one_error_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit, match="^error: --flow .* does not exist"):
        behavior_likelihood.main([str(run), "--flow", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="^error: --episodes -1 is not allowed"):
        behavior_likelihood.main([str(run), "--flow", str(tmp_path / "missing.pt"), "--episodes", "-1"])
    flow = cnf.ConditionalFlow(3, 5, 2, 16)
    torch.save({"flow": flow.state_dict(), "sizes": flow.describe(), "base_distribution": "uniform",
                "state_mean": torch.zeros(5), "state_std": torch.ones(5)}, tmp_path / "flow.pt")
    with pytest.raises(SystemExit, match=r"^error: .* \(no config.yaml\)"):
        behavior_likelihood.main([str(run), "--flow", str(tmp_path / "flow.pt")])
    config = tiny_run_config(tmp_path, train_steps=20, flow_steps=10)
    cnf.train(replace(config, run_name="cnf"))
    with pytest.raises(SystemExit, match="^error: --flow .* 3-dim actions and 5-dim states; .* has 3 and 11"):
        behavior_likelihood.main([str(tmp_path / "cnf"), "--flow", str(tmp_path / "flow.pt")])


# ---- report.py -----------------------------------------------------------------------------------------
def fake_flow_run(root, algorithm, seed, ood, clip=None):
    run = root / f"{algorithm}-halfcheetah-medium-gymv5-seed{seed}-20250101-000000"
    run.mkdir(parents=True)
    config = {"env": "halfcheetah-medium-gymv5", "seed": seed, **({"latent_clip": clip} if clip is not None else {})}
    (run / "config.yaml").write_text(json.dumps(config))
    evaluations = [(1000 * k, 10.0 * k + seed) for k in range(1, 4)]
    lines = [{"step": s, "eval/normalized_score": v} for s, v in evaluations]
    lines += [{"step": s, "diag/policy_nll": -1.0 + 10 * ood * k, "diag/data_nll": -2.0, "diag/ood_rate": ood * k,
               "diag/latent_abs_max": 0.9 * k} for k, (s, _) in enumerate(evaluations, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    edges = list(cnf.LATENT_EDGES)
    counts = np.zeros((3, len(edges) + 1), int)
    counts[:, 15] = 10
    histogram = {"step": 3000, "n_states": 10, "edges": edges, "counts": counts.tolist(),
                 "data_counts": counts.tolist()}
    (run / "latent_histograms.jsonl").write_text(json.dumps({**histogram, "step": 2000}) + "\n"
                                                 + json.dumps(histogram) + "\n")
    (run / "results.json").write_text(json.dumps({
        "algorithm": algorithm, "dataset": "halfcheetah-medium-gymv5", "last10_mean_normalized_score": 20.0 + seed,
        "evaluations": [{"step": s, "normalized_score": v} for s, v in evaluations]}))
    return run


def test_report_plots_and_tabulates_the_diagnostic(tmp_path):
    for seed in (0, 1):
        fake_flow_run(tmp_path / "runs", "cnf", seed, ood=0.01 * (seed + 1))
        fake_flow_run(tmp_path / "runs", "cnf_normal_ablation", seed, ood=0.1, clip=0.0)
    out = tmp_path / "report"
    text = report.main([str(tmp_path / "runs"), "--out", str(out), "--split_by", "latent_clip"]).read_text()
    for kind in ("behaviour_likelihood", "latent_histograms"):
        assert (out / f"{kind}_halfcheetah-medium-gymv5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({kind}_halfcheetah-medium-gymv5.png)" in text
    table = text.split("## Behaviour likelihood (last evaluation)")[1].split("\n## ")[0]
    assert "| halfcheetah-medium-gymv5 | cnf | -0.55 ± 0.15 | -2.00 ± 0.00 | 4.50% ± 1.50% | 2.70 ± 0.00 | 2 |" in table
    assert "| cnf_normal_ablation[latent_clip=0.0] | 2.00 ± 0.00 | -2.00 ± 0.00 | 30.00% ± 0.00% |" in table
    summary = json.loads((out / "summary.json").read_text())["groups"]["halfcheetah-medium-gymv5|cnf"]
    assert summary["diagnostics"]["ood_rate"] == pytest.approx([0.03, 0.06])
    run = report.read_run(next((tmp_path / "runs").glob("cnf-*")), report.known_algorithms())
    assert run.latent_histogram["step"] == 3000  # the last evaluation's histogram
