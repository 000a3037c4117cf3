"""cnf.py `--seeds`: N agents in lock-step over one flow (SeedCNF), one run directory per seed (SeedRuns).

One seed is today's update exactly; with N seeds each seed's agent is CNF's, step by step, and no gradient
crosses seeds; a run writes every seed's directory as a single run would, resumes exactly from any one of
them (even after a stop between the seeds' checkpoint writes), and report.py counts its seeds."""
import copy
import json
from dataclasses import replace

import pyrallis
import pytest
import torch

import cnf
import report
from conftest import TINY_FLOW_RUN_FLAGS, random_flow, run_algorithm, tiny_flow_config

STATE_DIM, ACTION_DIM, BATCH = 5, 3, 64


def tiny_config(**overrides):
    return tiny_flow_config(cnf.TrainConfig, **overrides)


def batch_of(generator, *leading):
    """A random batch (states, actions, rewards, next states, dones) of shape [*leading, ...]."""
    shape = (*leading, BATCH)
    states, next_states = (torch.randn(*shape, STATE_DIM, generator=generator) for _ in range(2))
    actions = torch.rand(*shape, ACTION_DIM, generator=generator) * 1.8 - 0.9
    rewards, dones = torch.randn(*shape, 1, generator=generator), (torch.rand(*shape, 1, generator=generator) < 0.1)
    return states, actions, rewards, next_states, dones.float()


def todays_update(agent, batch):
    """CNF.train as it was before the seed axis (commit a5d5e03), kept here as the reference for one seed."""
    states, actions, rewards, next_states, dones = batch
    cfg = agent.config
    with torch.no_grad():
        next_actions = agent.flow.decode(agent.actor(next_states), next_states)
        next_q = agent.target_critic(next_states, next_actions).min(0).values
        target = rewards + cfg.gamma * (1.0 - dones) * next_q
    q = agent.critic(states, actions)
    critic_loss = ((q - target) ** 2).mean(dim=(1, 2)).sum()
    agent.critic_optimizer.zero_grad(set_to_none=True)
    critic_loss.backward()
    agent.critic_optimizer.step()
    policy_actions = agent.flow.decode(agent.actor(states), states)
    with torch.no_grad():
        both = agent.critic(torch.cat([states, states]), torch.cat([actions, policy_actions]))
        q_data, q_policy = both.min(0).values.chunk(2)
        weights = torch.exp((q_data - q_policy) / cfg.awac_lambda).clamp(max=cfg.exp_adv_max)
    actor_loss = (weights * (actions - policy_actions).abs()).mean()
    agent.actor_optimizer.zero_grad(set_to_none=True)
    actor_loss.backward()
    agent.actor_optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(agent.target_critic.parameters()), list(agent.critic.parameters()), cfg.tau)
    return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(),
            "q_mean": q.detach().mean(), "adv_weight_mean": weights.mean()}


def agent_tensors(agent):
    """Every parameter and optimiser moment of an agent, in a fixed order."""
    state = agent.state_dict()
    tensors = [t for network in ("actor", "critic", "target_critic") for t in state[network].values()]
    for optimizer in ("actor_optimizer", "critic_optimizer"):
        for moments in state[optimizer]["state"].values():
            tensors += [moments["exp_avg"], moments["exp_avg_sq"]]
    return tensors


def seed_agents(seeds=3, **overrides):
    torch.manual_seed(0)
    flow = random_flow(cnf.ConditionalFlow, ACTION_DIM, state_dim=STATE_DIM, n_blocks=2, hidden=16,
                       dtype=torch.float32)
    return cnf.SeedCNF(flow, STATE_DIM, ACTION_DIM, tiny_config(**overrides), seeds), flow


def seed_slice(agent, i, flow):
    """Seed i of a SeedCNF as a CNF agent, loaded from its single-run checkpoint format."""
    single = cnf.CNF(copy.deepcopy(flow), STATE_DIM, ACTION_DIM, agent.config)
    single.load_state_dict(agent.seed_state_dict(agent.state_dict(), i))
    return single


# %% (a) one seed: today's update, and `--seeds S` is `--seed S`
def test_one_seed_update_is_exactly_todays():
    torch.manual_seed(0)
    flow = random_flow(cnf.ConditionalFlow, ACTION_DIM, state_dim=STATE_DIM, n_blocks=2, hidden=16,
                       dtype=torch.float32)
    agent = cnf.CNF(flow, STATE_DIM, ACTION_DIM, tiny_config())
    reference = copy.deepcopy(agent)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        batch = batch_of(g)
        rng = torch.get_rng_state()
        new = agent.train(batch)
        torch.set_rng_state(rng)
        old = todays_update(reference, batch)
        assert all(torch.equal(new[k], old[k]) for k in old), (new, old)
    assert all(torch.equal(a, b) for a, b in zip(agent_tensors(agent), agent_tensors(reference)))


def test_one_seed_in_seeds_is_a_single_run(tmp_path, tiny_hdf5):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                         train_steps=20, eval_every=10, eval_episodes=2, flow_steps=20, flow_eval_every=10)
    single = json.loads(cnf.train(replace(config, seed=3, run_name="single")).read_text())
    seeds = json.loads(cnf.train(replace(config, seeds=[3], run_name="seeds")).read_text())
    assert seeds["seed"] == 3 and seeds["evaluations"] == single["evaluations"]
    actors = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["agent"]["actor"]
              for name in ("single", "seeds")]
    assert all(torch.equal(actors[0][k], actors[1][k]) for k in actors[0])


# %% (b) N seeds: each seed's agent is CNF's, the agents differ, losses fall, no gradient crosses seeds
def test_each_seed_steps_exactly_like_a_cnf_agent(monkeypatch):
    """Seed i of a SeedCNF follows a CNF agent started from its weights and given seed i's batches. The latent
    policy's noise is switched off (z = tanh(mu)) in both, so the two see the same draws; that every seed draws
    its own noise is checked below (test_seeds_draw_their_own_noise)."""
    agent, flow = seed_agents()
    singles = [seed_slice(agent, i, flow) for i in range(3)]
    g = torch.Generator().manual_seed(1)
    batches = [batch_of(g, 3) for _ in range(3)]
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    losses = [agent.train(batch) for batch in batches]
    for i, single in enumerate(singles):
        single_losses = [single.train(tuple(x[i] for x in batch)) for batch in batches]
        for ours, theirs in zip(losses, single_losses):
            for key, value in theirs.items():
                assert ours[(i, key)].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
        for ours, theirs in zip(agent_tensors(seed_slice(agent, i, flow)), agent_tensors(single)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    states = torch.randn(7, STATE_DIM)
    acted = agent.act(states.repeat(3, 1)).view(3, 7, ACTION_DIM)
    for i in range(3):
        torch.testing.assert_close(acted[i], seed_slice(agent, i, flow).act(states))
        torch.testing.assert_close(agent.seed_policy(i)(states)[0], acted[i])


def test_seeds_draw_their_own_noise():
    """Two seeds with the same weights and the same batch: their sampled latents, hence their losses, differ."""
    agent, _ = seed_agents(seeds=2)
    with torch.no_grad():
        for named in agent.params.values():
            for value in named.values():
                value[1] = value[0]
    batch = tuple(x[:1].expand(2, *x.shape[1:]) for x in batch_of(torch.Generator().manual_seed(1), 1))
    losses = agent.train(batch)
    assert losses[(0, "critic_loss")] != losses[(1, "critic_loss")]


def test_no_gradient_crosses_seeds():
    """Perturbing seed 1's batch leaves seed 0's parameters and optimiser state bitwise unchanged."""
    agent, flow = seed_agents(seeds=2)
    other = copy.deepcopy(agent)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = batch_of(g, 2)
        perturbed = tuple(x.clone() for x in batch)
        for x in perturbed:
            x[1] = torch.randn(x[1].shape, generator=g) if x.shape[-1] > 1 else 0.0
        rng = torch.get_rng_state()
        agent.train(batch)
        torch.set_rng_state(rng)
        other.train(perturbed)
    ours, theirs = (agent_tensors(seed_slice(a, 0, flow)) for a in (agent, other))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    ours, theirs = (agent_tensors(seed_slice(a, 1, flow)) for a in (agent, other))
    assert not all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_seed_agents_differ_and_each_learns():
    """Every transition terminal with reward 1: each seed's critics approach Q = 1; the seeds' policies differ."""
    agent, flow = seed_agents(critic_lr=1e-3)
    g = torch.Generator().manual_seed(1)
    states, actions = torch.randn(3, 256, STATE_DIM, generator=g), torch.rand(3, 256, ACTION_DIM, generator=g) - 0.5
    batch = (states, actions, torch.ones(3, 256, 1), torch.randn(3, 256, STATE_DIM, generator=g), torch.ones(3, 256, 1))
    first = agent.train(batch)
    for _ in range(300):
        last = agent.train(batch)
    for i in range(3):
        assert last[(i, "critic_loss")] < 0.05 * first[(i, "critic_loss")]
    for i in range(3):
        assert (seed_slice(agent, i, flow).critic(states[i], actions[i]) - 1.0).abs().mean() < 0.05
    acted = agent.act(states[0].repeat(3, 1)).view(3, 256, ACTION_DIM)
    assert (acted[0] - acted[1]).abs().mean() > 1e-3 and (acted[1] - acted[2]).abs().mean() > 1e-3


def test_seeds_update_has_no_host_sync():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.count += func.overloadpacket == torch.ops.aten._local_scalar_dense
            return func(*args, **(kwargs or {}))

    agent, _ = seed_agents()
    batch = batch_of(torch.Generator().manual_seed(1), 3)
    agent.train(batch)
    with Syncs():
        agent.train(batch)
    assert Syncs.count == 0


# %% (c) end to end: one directory per seed, resume from any of them, (d) report.py counts the seeds
def test_end_to_end_writes_one_run_directory_per_seed_and_report_counts_them(tmp_path, tiny_hdf5):
    runs = tmp_path / "runs"
    proc = run_algorithm("cnf", "--dataset_path", tiny_hdf5, "--checkpoints_path", str(runs), "--seeds", "0", "1",
                         *TINY_FLOW_RUN_FLAGS)
    assert proc.returncode == 0, proc.stderr
    dirs = sorted(runs.iterdir())
    assert [d.name.split("-")[:3] for d in dirs] == [["cnf", "tiny", "seed0"], ["cnf", "tiny", "seed1"]]
    assert proc.stdout.strip().splitlines()[-1] == f"results: {dirs[0] / 'results.json'}"
    for seed, run_dir in enumerate(dirs):
        results = json.loads((run_dir / "results.json").read_text())
        assert (results["seed"], [e["step"] for e in results["evaluations"]]) == (seed, [20, 40])
        config = cnf.load_yaml_config(cnf.TrainConfig, str(run_dir / "config.yaml"), "config")
        assert (config.seed, config.seeds) == (seed, [0, 1])
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
        checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        assert checkpoint["step"] == 40 and checkpoint["evaluations"] == [(e["step"], e["normalized_score"])
                                                                          for e in results["evaluations"]]
        assert torch.equal(torch.load(run_dir / "flow.pt", weights_only=True)["flow"]["blocks.0.actnorm.shift"],
                           torch.load(dirs[0] / "flow.pt", weights_only=True)["flow"]["blocks.0.actnorm.shift"])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "eval/normalized_score" in r] == [20, 40]
        assert [r["step"] for r in rows if "diag/policy_nll" in r] == [20, 40]
        assert len((run_dir / "latent_histograms.jsonl").read_text().splitlines()) == 2
    scores = [json.loads((d / "results.json").read_text())["final_normalized_score"] for d in dirs]
    assert scores[0] != scores[1]  # two agents, not one agent twice
    assert "flow/valid_nll" in (dirs[0] / "metrics.jsonl").read_text()  # phase 1 ran once, in the first seed's run
    assert "flow/valid_nll" not in (dirs[1] / "metrics.jsonl").read_text()

    lines = report.main([str(runs), "--out", str(tmp_path / "report")]).read_text().splitlines()
    header, row = (next(line for line in lines if line.startswith(start)) for start in ("| dataset |", "| tiny |"))
    cells = dict(zip(*([c.strip() for c in line.strip("|").split("|")] for line in (header, row))))
    assert cells["cnf"].endswith("(2)"), cells  # mean +- std over 2 seeds


def stop_between_checkpoint_writes(monkeypatch, stop_at):
    """Ctrl-C while the seeds' checkpoints of step `stop_at` are written: after seed 0's, before seed 1's."""
    original = cnf.Run.save_checkpoint

    def save_checkpoint(self, state):
        if self.phase == "rl" and self.step == stop_at and self.config.seed == 1:
            raise KeyboardInterrupt
        original(self, state)

    monkeypatch.setattr(cnf.Run, "save_checkpoint", save_checkpoint)


def test_resume_from_any_seed_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_hdf5, monkeypatch):
    config = tiny_config(dataset_path=tiny_hdf5, checkpoints_path=str(tmp_path), wandb_mode="disabled", seeds=[0, 1],
                         train_steps=60, eval_every=20, log_every=10, eval_episodes=2, flow_steps=40,
                         flow_eval_every=10)
    cnf.train(replace(config, run_name="full"))
    stop_between_checkpoint_writes(monkeypatch, stop_at=40)
    with pytest.raises(KeyboardInterrupt):
        cnf.train(replace(config, run_name="stopped"))
    steps = [torch.load(tmp_path / f"stopped-seed{s}" / "checkpoint.pt", weights_only=True)["step"] for s in (0, 1)]
    assert steps == [40, 20]  # seed 1's write of step 40 never happened
    monkeypatch.undo()
    cnf.train(replace(config, seed=1, run_name="stopped-seed1", resume=str(tmp_path / "stopped-seed1")))
    for seed in (0, 1):
        full, resumed = tmp_path / f"full-seed{seed}", tmp_path / f"stopped-seed{seed}"
        assert (json.loads((resumed / "results.json").read_text())["evaluations"]
                == json.loads((full / "results.json").read_text())["evaluations"])
        agents = [torch.load(d / "checkpoint.pt", weights_only=True)["agent"] for d in (full, resumed)]
        for network in ("actor", "critic", "target_critic"):
            assert all(torch.equal(agents[0][network][k], agents[1][network][k]) for k in agents[0][network])
        assert (resumed / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()  # each line once


# %% Bad input: one error line, before any work
@pytest.mark.parametrize("flags, word", [
    (["--seeds", "0", "0"], "--seeds"),
    (["--seeds", "0", "-1"], "--seeds"),
    (["--seed", "5", "--seeds", "0", "1"], "--seed 5"),
])
def test_bad_seeds_are_one_error_line_before_any_work(tmp_path, tiny_hdf5, flags, word):
    with pytest.raises(SystemExit, match=f"^error: .*{word}"):
        cnf.train(cnf.parse_config(cnf.TrainConfig, ["--dataset_path", tiny_hdf5, "--checkpoints_path",
                                                     str(tmp_path / "runs"), *flags]))
    assert not (tmp_path / "runs").exists()


def test_resume_with_other_seeds_is_refused(tmp_path, tiny_hdf5):
    run_dir = tmp_path / "r-seed1"
    run_dir.mkdir()
    with open(run_dir / "config.yaml", "w") as f:  # a stopped seeds run's config, as start_run writes it
        pyrallis.dump(tiny_config(dataset_path=tiny_hdf5, seeds=[0, 1], seed=1, resume=str(run_dir)), f)
    for flags, word in ((["--seeds", "0", "2"], "started with --seeds 0 1"), ([], "is gone")):
        with pytest.raises(SystemExit, match=f"^error: .*{word}"):  # other seeds; then r-seed0 missing
            cnf.train(cnf.parse_config(cnf.TrainConfig, ["--resume", str(run_dir), *flags]))
    proc = run_algorithm("cnf", "--resume", str(run_dir), "--seeds", "1", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --seeds 1 but the run in {run_dir} was started with --seeds 0 1; leave --seeds out"]
