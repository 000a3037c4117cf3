"""algorithms/sfbc.py: the DPM-Solver sampler against exact scores, returns and planning, selection, the run loop."""
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import sfbc
from conftest import run_algorithm

SDE = sfbc.VPSDE(0.1, 20.0)


class MixtureNoise:
    """The exact noise prediction eps(a_t, t, s) = -sigma_t grad log p_t(a_t | s) of a Gaussian mixture
    p_0(a | s) = sum_k w_k N(mu_k + shift * s_0, std_k^2 I): under the VP-SDE, p_t(a | s) = sum_k w_k
    N(alpha_t (mu_k + shift * s_0), (alpha_t^2 std_k^2 + sigma_t^2) I). Called like the score network:
    (noisy [S, C, A], t [S], states [S, state_dim]) -> [S, C, A]; a solver fed this needs no training."""

    def __init__(self, weights, means, stds, shift=0.0):
        self.log_weights = torch.log(torch.tensor(weights, dtype=torch.float64))  # [K]
        self.means = torch.tensor(means, dtype=torch.float64)  # [K, A]
        self.stds = torch.tensor(stds, dtype=torch.float64)  # [K]
        self.shift, self.action_dim = shift, self.means.shape[1]

    def noise(self, x: torch.Tensor, t: float, means: torch.Tensor) -> torch.Tensor:
        """eps at one time t for samples x [C, A] of the mixture with component means [K, A]."""
        alpha, sigma, _ = SDE.coefficients(t)
        variance = alpha ** 2 * self.stds ** 2 + sigma ** 2  # [K]
        diff = x.double()[:, None, :] - alpha * means  # [C, K, A]
        log_density = -0.5 * (diff ** 2).sum(-1) / variance - 0.5 * self.action_dim * variance.log() + self.log_weights
        responsibilities = torch.softmax(log_density, dim=-1)[..., None]  # [C, K, 1]
        score = -(responsibilities * diff / variance[:, None]).sum(1)  # grad_a log p_t(a): [C, A]
        return (-sigma * score).to(x.dtype)

    def __call__(self, noisy, t, states):
        return torch.stack([self.noise(x, float(time), self.means + self.shift * float(state[0]))
                            for x, time, state in zip(noisy, t, states)])


def solver_config(steps=15, order=3):
    return sfbc.TrainConfig(device="cpu", solver_steps=steps, solver_order=order, solver_t_end=1e-3)


@pytest.mark.parametrize("steps, weight_tol, place_tol, spread_tol", [
    (15, 0.015, 0.06, 0.4),  # the official 15 evaluations: a coarse time-uniform grid near t = 0 blurs the modes a bit
    (100, 0.01, 0.005, 0.1),  # finer: the discretisation error vanishes (the solver, not the score, set the above)
])
def test_dpm_solver_recovers_a_known_mixture_from_its_exact_score(steps, weight_tol, place_tol, spread_tol):
    """From noise to the two modes of every state, at their places, with their weights and widths."""
    torch.manual_seed(0)
    model = MixtureNoise(weights=[0.3, 0.7], means=[[-0.5], [0.4]], stds=[0.1, 0.15], shift=0.2)
    states = torch.tensor([[-1.0], [0.0], [1.0]])
    actions = sfbc.sample_actions(model, states, 10_000, SDE, solver_config(steps=steps))  # [S, C, 1], one pass
    assert actions.shape == (3, 10_000, 1)
    alpha_end, sigma_end = (float(v) for v in SDE.alpha_sigma(torch.tensor(1e-3)))  # p_{t_end}, not quite p_0
    for s, samples in zip(states[:, 0].tolist(), actions[..., 0]):
        low, high = -0.5 + 0.2 * s, 0.4 + 0.2 * s
        left = samples < (low + high) / 2
        assert left.float().mean().item() == pytest.approx(0.3, abs=weight_tol)
        for part, mean, std in ((samples[left], low, 0.1), (samples[~left], high, 0.15)):
            assert part.mean().item() == pytest.approx(alpha_end * mean, abs=place_tol)
            assert part.std().item() == pytest.approx(math.hypot(alpha_end * std, sigma_end), rel=spread_tol)


def euler_probability_flow(eps, x, t_end, steps):
    """da/dt = -beta(t) / 2 (a - eps(a, t) / sigma_t), integrated by Euler from t = 1 to t_end on a grid
    geometric in t (fine where the ODE is stiff, near t = 0)."""
    times = torch.logspace(0.0, math.log10(t_end), steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        _, sigma, _ = SDE.coefficients(t)
        x = x + (t_next - t) * (-0.5 * SDE.beta(t) * (x - eps(x, t) / sigma))
    return x


def test_dpm_solver_with_many_steps_matches_a_fine_euler_integration():
    model = MixtureNoise(weights=[0.5, 0.2, 0.3], means=[[-0.6, 0.1], [0.2, 0.7], [0.5, -0.4]], stds=[0.1, 0.05, 0.2])
    eps = lambda x, t: model.noise(x, t, model.means)  # noqa: E731
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    euler = euler_probability_flow(eps, noise, 1e-3, 2500)
    for order, steps in ((3, 300), (2, 400), (1, 1200)):
        dpm = sfbc.dpm_solver_sample(eps, noise, SDE, steps, order, 1e-3)
        error = (dpm - euler).abs().max(-1).values
        # A trajectory that starts on the border between two modes' basins may end in either: allow 1%.
        assert error.median().item() < 1.5e-3 and (error < 6e-3).double().mean().item() >= 0.99, (order, error.max())
    assert (dpm - noise).abs().mean().item() > 0.3  # it went somewhere


def test_solver_orders_spend_exactly_the_function_evaluations():
    assert sfbc.solver_orders(15, 3) == [3, 3, 3, 3, 2, 1]  # the official setting: DPM-Solver-fast, 15 NFE
    for steps in range(1, 20):
        for order in (1, 2, 3):
            orders = sfbc.solver_orders(steps, order)
            assert sum(orders) == steps and max(orders) <= order


def test_candidates_share_their_states_features():
    """[S, C, A] in one pass equals every candidate run on its own row with its state repeated."""
    torch.manual_seed(0)
    model = sfbc.ScoreNetwork(3, 5, (16, 8, 4))
    states, t, noisy = torch.randn(4, 5), torch.rand(4), torch.randn(4, 6, 3)
    batched = model(noisy, t, states)
    rows = model(noisy.reshape(24, 3), t.repeat_interleave(6), states.repeat_interleave(6, dim=0))
    assert torch.allclose(batched.reshape(24, 3), rows, atol=1e-6)


def toy_data():
    """Episode A: rows 0-2, ends by termination; B: rows 3-5, ends by a timeout (row 5, dropped by the
    conversion); C: row 6, cut by the file's end (row 7 dropped: no next row). Rewards r_i = i."""
    raw = {"observations": np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32),
           "actions": np.zeros((8, 1), np.float32), "rewards": np.arange(8, dtype=np.float32),
           "terminals": np.array([0, 0, 1, 0, 0, 0, 0, 0], bool), "timeouts": np.array([0, 0, 0, 0, 0, 1, 0, 0], bool)}
    return sfbc.OfflineData(name="toy", make_eval_env=None, normalize_score=None, **sfbc.qlearning_dataset(raw))


def test_monte_carlo_returns_of_a_hand_computed_episode_with_a_terminal_and_a_timeout():
    data = toy_data()  # kept rows 0, 1, 2 | 3, 4 | 6
    np.testing.assert_array_equal(data.rewards, [0, 1, 2, 3, 4, 6])
    ends = sfbc.episode_ends(data)
    np.testing.assert_array_equal(ends, [False, False, True, False, True, True])
    # gamma 0.5: R2 = 2, R1 = 1 + 0.5 * 2, R0 = 0 + 0.5 * 2 | R4 = 4 (timeout: no bootstrap), R3 = 3 + 0.5 * 4 | R6 = 6
    np.testing.assert_allclose(sfbc.planned_returns(data.rewards, ends, 0.5), [1, 2, 2, 5, 4, 6])
    # With V(s) = (0, 10, -inf, 0, 0, 0): R1 = max(1 + 0.5 * 2, 10) = 10 and R0 = max(0 + 0.5 * 10, 0) = 5.
    values = np.array([0, 10, -np.inf, 0, 0, 0])
    np.testing.assert_allclose(sfbc.planned_returns(data.rewards, ends, 0.5, values), [5, 10, 2, 5, 4, 6])
    targets, mean, std = sfbc.normalize_returns(np.array([1.0, 1.0, 1.0]))
    assert (mean, std) == (1.0, 0.1) and not targets.any()  # std floored at 0.1


def test_a_planning_round_never_lowers_a_target():
    rng = np.random.default_rng(0)
    rewards, ends = rng.normal(size=3000), rng.random(3000) < 0.02
    monte_carlo = sfbc.planned_returns(rewards, ends, 0.99)
    values = rng.normal(0.0, 30.0, size=3000)
    planned = sfbc.planned_returns(rewards, ends, 0.99, values)
    assert (planned >= monte_carlo - 1e-9).all() and (planned >= values).all()
    assert (planned > monte_carlo + 1e-6).mean() > 0.1  # planning did raise some
    higher = sfbc.planned_returns(rewards, ends, 0.99, values + rng.random(3000))
    assert (higher >= planned).all()  # a larger V never lowers a target
    np.testing.assert_allclose(sfbc.planned_returns(rewards, ends, 0.99, np.full(3000, -np.inf)), monte_carlo)


def test_plan_works_in_return_units_over_the_cached_candidates():
    """`plan` with a critic that says Q = 3 (normalised) everywhere: V = 3 std + mean in return units."""
    data = toy_data()
    buffer = sfbc.ReplayBuffer(data, "cpu")
    critic = sfbc.Critic(2, 1, 8)
    with torch.no_grad():
        critic.out.weight.zero_()
        critic.out.bias.fill_(3.0)
    cache = {"indices": torch.tensor([0, 3]), "candidates": torch.zeros(2, 5, 1)}  # candidates for rows 0 and 3
    config = sfbc.TrainConfig(device="cpu", gamma=0.5, value_alpha=20.0)
    targets, mean, std, won = sfbc.plan(critic, buffer, cache, data.rewards, sfbc.episode_ends(data), 1.0, 2.0, config)
    # V = 3 * 2 + 1 = 7 at rows 0 and 3 only: R0 = max(0 + 0.5 * 2, 7) = 7, R3 = max(3 + 0.5 * 4, 7) = 7.
    np.testing.assert_allclose(targets * std + mean, [7, 2, 2, 7, 4, 6], atol=1e-5)
    assert won == 1.0


def test_selection_with_large_alpha_picks_the_argmax_candidate():
    torch.manual_seed(0)
    candidates, q = torch.randn(64, 32, 3), torch.randn(64, 32)
    best = candidates[torch.arange(64), q.argmax(-1)]
    assert torch.equal(sfbc.select_actions(candidates, q, 1e6, 1), best)
    top4 = candidates.gather(1, q.topk(4, -1).indices[..., None].expand(-1, -1, 3)).mean(1)
    assert torch.allclose(sfbc.select_actions(candidates, q, 1e6, 4), top4)  # 4 draws without replacement
    assert torch.allclose(sfbc.select_actions(candidates, q, 1.0, 32), candidates.mean(1), atol=1e-6)  # all of them


def test_selection_draws_with_softmax_probabilities():
    torch.manual_seed(0)
    candidates = torch.tensor([0.0, 1.0, 2.0]).reshape(1, 3, 1).expand(60_000, -1, -1)
    q = torch.log(torch.tensor([1.0, 2.0, 3.0])).expand(60_000, -1) / 100.0  # softmax(100 q) = (1, 2, 3) / 6
    picked = sfbc.select_actions(candidates, q, 100.0, 1)[:, 0].long()
    assert torch.bincount(picked, minlength=3).div(60_000).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.01)


TINY = dict(score_widths=(32, 16), critic_hidden=32, critic_steps=30, planning_candidates=4, eval_candidates=4,
            solver_steps=3, train_steps=40, eval_every=20, batch_size=32, eval_episodes=2, log_every=10)


def tiny_flags():
    flags = []
    for key, value in TINY.items():
        flags += [f"--{key}", *map(str, value)] if isinstance(value, tuple) else [f"--{key}", str(value)]
    return flags


def test_end_to_end_run_writes_what_it_promises(tmp_path, tiny_hdf5):
    proc = run_algorithm("sfbc", "--dataset_path", tiny_hdf5, "--checkpoints_path", str(tmp_path), "--run_name", "run",
                         *tiny_flags(), "--planning_states", "500", "--amp")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert proc.stdout.strip().splitlines()[-1] == f"results: {run / 'results.json'}"
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == "sfbc" and results["select_count"] == 1  # "tiny": not a locomotion name
    assert [e["step"] for e in results["evaluations"]] == [20, 30, 50, 60]  # 2 rounds of 30 critic updates
    assert results["final_normalized_score"] == results["evaluations"][-1]["normalized_score"]
    assert results["behavior_steps_per_s"] > 0 and results["candidate_actions_per_s"] > 0
    cache = torch.load(run / "candidates.pt", weights_only=True)
    assert cache["candidates"].shape == (500, 4, 3) and cache["candidates"].abs().max() <= 1.0
    behavior = torch.load(run / "behavior.pt", weights_only=True)
    assert behavior["sizes"] == {"action_dim": 3, "state_dim": 11, "widths": [32, 16]}
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (checkpoint["phase"], checkpoint["agent"]["round"], checkpoint["agent"]["round_step"]) == ("rl", 1, 30)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("planning/v_won_fraction" in m for m in metrics) and any("behavior/loss" in m for m in metrics)


def stopped_then_resumed(config, trainer_class, stop_after, monkeypatch):
    """Run `config` as run "stopped" until `trainer_class.train` is called the (stop_after + 1)-th time (a
    kill), then --resume it; return its results, run directory and the phase of the checkpoint it resumed from."""
    calls, original = {"n": 0}, trainer_class.train

    def stop(self, *batch):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise KeyboardInterrupt
        return original(self, *batch)

    monkeypatch.setattr(trainer_class, "train", stop)
    with pytest.raises(KeyboardInterrupt):
        sfbc.train(replace(config, run_name="stopped"))
    monkeypatch.setattr(trainer_class, "train", original)
    run_dir = Path(config.checkpoints_path) / "stopped"
    phase = torch.load(run_dir / "checkpoint.pt", weights_only=True)["phase"]
    return json.loads(sfbc.train(replace(config, resume=str(run_dir))).read_text()), run_dir, phase


@pytest.mark.parametrize("trainer, stop_after, phase", [
    ("BehaviorTrainer", 25, "behavior"),  # checkpoint at behaviour step 20
    ("CriticTrainer", 5, "behavior"),  # candidates cached, no critic checkpoint yet: planning starts afresh
    ("CriticTrainer", 45, "rl"),  # round 2 (its first evaluation would come at update 50): resumes after planning
])
def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch, trainer, stop_after, phase):
    config = sfbc.TrainConfig(device="cpu", dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path),
                              wandb_mode="disabled", **{**TINY, "eval_episodes": 1})
    full = json.loads(sfbc.train(replace(config, run_name="full")).read_text())
    resumed, run_dir, resumed_from = stopped_then_resumed(config, getattr(sfbc, trainer), stop_after, monkeypatch)
    assert resumed_from == phase
    assert resumed["evaluations"] == full["evaluations"]
    assert [e["step"] for e in resumed["evaluations"]] == [20, 30, 50, 60]
    load = lambda name: [torch.load(d / name, weights_only=True) for d in (tmp_path / "full", run_dir)]  # noqa: E731
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(*[saved["model"] for saved in load("behavior.pt")])
    assert torch.equal(*[saved["candidates"] for saved in load("candidates.pt")])
    assert same(*[saved["agent"]["critic"]["critic"] for saved in load("checkpoint.pt")])


@pytest.mark.parametrize("trainer, at, phase", [("BehaviorTrainer", 23, "behavior"), ("CriticTrainer", 37, "rl")])
def test_a_polite_stop_between_checkpoints_saves_that_step_and_resumes_exactly(tmp_path, tiny_hdf5, monkeypatch,
                                                                                  trainer, at, phase):
    """SIGTERM (as `polite_stop` records it) during behaviour step 23, or critic update 37 (round 2, update 7): the
    checkpoint holds that step, and the resumed run ends as the uninterrupted one."""
    config = sfbc.TrainConfig(device="cpu", dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path),
                              wandb_mode="disabled", **{**TINY, "eval_episodes": 1})
    full = json.loads(sfbc.train(replace(config, run_name="full")).read_text())
    calls, original = {"n": 0}, getattr(sfbc, trainer).train

    def signalled(self, *batch):
        calls["n"] += 1
        if calls["n"] == at:
            sfbc.Run.stop_signal = 15
        return original(self, *batch)

    monkeypatch.setattr(getattr(sfbc, trainer), "train", signalled)
    monkeypatch.setattr(sfbc.Run, "stop_signal", None)
    with pytest.raises(KeyboardInterrupt):
        sfbc.train(replace(config, run_name="stopped"))
    sfbc.Run.stop_signal = None
    monkeypatch.setattr(getattr(sfbc, trainer), "train", original)
    checkpoint = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert (checkpoint["phase"], checkpoint["step"]) == (phase, at)
    if phase == "rl":
        assert (checkpoint["agent"]["round"], checkpoint["agent"]["round_step"]) == (1, 7)
    resumed = json.loads(sfbc.train(replace(config, resume=str(tmp_path / "stopped"))).read_text())
    assert resumed["evaluations"] == full["evaluations"]


@pytest.mark.parametrize("field, value, message", [
    ("solver_order", 4, "--solver_order must be 1, 2 or 3"),
    ("select_count", 5, "--select_count must lie in [1, --eval_candidates]"),
    ("solver_t_end", 1.0, "--solver_t_end must lie in (0, 1)"),
])
def test_bad_settings_are_one_error_line(field, value, message):
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}$"):
        sfbc.train(sfbc.TrainConfig(device="cpu", **{**TINY, field: value}))
