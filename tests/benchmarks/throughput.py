"""Training throughput of the algorithm files, and of the official CNF code for comparison.

    python tests/benchmarks/throughput.py --device cpu [--threads 1] [--official /path/to/tinkoff-ai/cnf]

Prints one line per figure, `<algo> <metric> <value>`:
- `rl_updates_per_s`: phase-2 updates per second (cnf: actor and critics 4 x 256, batch 512, through
  a frozen 12 x 256 flow; HalfCheetah sizes, 17-dim states, 6-dim actions);
- `flow_steps_per_s`: phase-1 pre-training steps per second (flow 12 x 256, batch 1024);
- `cnf_seeds3`: cnf.py `--seeds 0 1 2` (SeedCNF: three agents, one batched update through one flow), same sizes:
  `rl_updates_per_s` is each seed's (one batched update moves every seed one step), `aten_ops_per_update` and
  `host_syncs_per_update` are per seed-update (the batched update's, divided by 3);
- `plas`: the official PLAS sizes (VAE 2 x 750, latent 12; actor and critics 400-300; batch 100);
  `vae_steps_per_s` is its phase-1 (VAE) pre-training steps per second;
- `lapo`: the official LAPO sizes (CVAE, latent policy, Q_1, Q_2, V all 3 x 256; batch 512), one joint update;
- `sfbc`: the official SfBC sizes (score network 512-256-128, batch 4096; DPM-Solver order 3, 15 steps):
  `behaviour_steps_per_s` (behaviour-model steps), `candidate_actions_per_s` (behaviour actions sampled for
  dataset states, 16 per state, in passes of 4096 states on a GPU, 64 on a CPU), `eval_step_ms` (the latency
  of one evaluation step: 32 candidates for each of 10 states, critic, selection), `critic_updates_per_s`;
- `aten_ops_per_update`, `host_syncs_per_update`: ATen operators dispatched by one phase-2 update,
  and how many of them are `aten::_local_scalar_dense` (a device-to-host copy: a stall on a GPU),
  counted with a TorchDispatchMode. On a GPU every operator is at least one kernel launch, so these
  are the GPU-efficiency figures a CPU can measure.

`--official DIR` also measures a checkout of github.com/tinkoff-ai/cnf (its modules need only torch):
its `AdvantageWeightedActorCritic.update` with the same sizes and its flow's log-prob training step
(the body of its `train_flow.optimize_flow`, repeated here because that module imports d4rl).
Nothing of it is copied into this project; it is imported from DIR at run time.
`--corl DIR` measures a checkout of github.com/corl-team/CORL the same way: `AdvantageWeightedActorCritic
.update` of its algorithms/offline/awac.py and `ImplicitQLearning.train` of its iql.py at their default
sizes (awac: actor and critics 4 x 256; iql: 3 x 256; batch 256), on the same batch as our awac.py and
iql.py (`awac`, `iql` lines). Its modules import d4rl and gym at the top: empty stub modules stand in
for them during the import. Nothing of it is copied into this project.
`--amp` measures our scripts with bfloat16 autocast as well; `--compile` each script's update as `--compile` runs it
(lines `<algo>_compiled`: rates only; cnf.py's flow step and sfbc.py's behaviour and acting steps too).
Timings use the median of `--repeats` rounds of `--seconds` each, after warm-up.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
STATE_DIM, ACTION_DIM = 17, 6  # HalfCheetah


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def load_algorithm(name: str):
    """algorithms/<name>.py as module `algorithms_<name>` (so that the official `cnf` package keeps its name)."""
    spec = importlib.util.spec_from_file_location(f"algorithms_{name}", ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def count_ops(step) -> Counter:
    with OpCounter() as counter:
        step()
    return counter.ops


def synchronize() -> None:
    """Wait for queued GPU work, so that a timing counts finished updates, not launched ones."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(step, seconds: float, repeats: int) -> float:
    """Median calls per second over `repeats` rounds of about `seconds` each."""
    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            n += 1
        synchronize()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def random_batch(batch_size: int, device: str):
    return (torch.randn(batch_size, STATE_DIM, device=device),
            torch.rand(batch_size, ACTION_DIM, device=device) * 1.8 - 0.9,
            torch.randn(batch_size, 1, device=device), torch.randn(batch_size, STATE_DIM, device=device),
            torch.zeros(batch_size, 1, device=device))


def report_update(algo: str, update, args, compile: bool = False) -> None:
    """The three figures of one training update: updates/s, ATen ops, host syncs; compiled (`algo` gets the suffix
    `_compiled`), updates/s only (a compiled graph runs generated kernels, which a dispatch mode does not see)."""
    if compile:
        report(f"{algo}_compiled", "rl_updates_per_s", rate(update, args.seconds, args.repeats))
        return
    report(algo, "rl_updates_per_s", rate(update, args.seconds, args.repeats))
    ops = count_ops(update)
    report(algo, "aten_ops_per_update", sum(ops.values()))
    report(algo, "host_syncs_per_update", ops["aten._local_scalar_dense"])


def report(algo: str, metric: str, value) -> None:
    print(f"{algo} {metric} {value:.1f}" if isinstance(value, float) else f"{algo} {metric} {value}", flush=True)


def paper_flow(cnf, config, device: str):
    """cnf.py's flow at the paper's sizes (12 x 256), ActNorm initialised on a random batch; with that batch."""
    flow = cnf.ConditionalFlow(ACTION_DIM, STATE_DIM, config.flow_layers, config.flow_hidden, config.amp).to(device)
    states = torch.randn(1024, STATE_DIM, device=device)
    actions = torch.rand(1024, ACTION_DIM, device=device) * 1.8 - 0.9
    flow.encode(actions, states, initialize=True)
    return flow, states, actions


def measure_cnf(args, amp: bool, compile: bool = False) -> None:
    """CNF at the paper's sizes. With `compile`, the update and the flow step go through the script's own
    `compiled` (torch.compile; CUDA graphs on a GPU); ops and syncs are then not counted (the compiled
    graph runs generated kernels, which a dispatch mode does not see one by one)."""
    cnf = load_algorithm("cnf")
    name = ("cnf_compiled" if compile else "cnf") + ("_bf16" if amp else "")
    config = cnf.TrainConfig(device=args.device, amp=amp, compile=compile)  # the paper's sizes are the defaults
    flow, states, actions = paper_flow(cnf, config, args.device)
    pretrainer = cnf.FlowPretrainer(flow, config)
    flow_step = cnf.compiled(lambda: pretrainer.train(actions, states)["flow/train_nll"], config)
    report(name, "flow_steps_per_s", rate(flow_step, args.seconds, args.repeats))

    agent = cnf.CNF(flow, STATE_DIM, ACTION_DIM, config)
    batch = random_batch(config.batch_size, args.device)
    update = cnf.compiled(lambda: agent.train(batch), config)
    if compile:
        report(name, "rl_updates_per_s", rate(update, args.seconds, args.repeats))
    else:
        report_update(name, update, args)


def measure_cnf_seeds(args, seeds: int = 3) -> None:
    """cnf.py --seeds (SeedCNF) at the paper's sizes: per-seed updates/s, and ops and syncs per seed-update."""
    cnf = load_algorithm("cnf")
    config = cnf.TrainConfig(device=args.device)  # the paper's sizes are the defaults
    agent = cnf.SeedCNF(paper_flow(cnf, config, args.device)[0], STATE_DIM, ACTION_DIM, config, seeds)
    batch = tuple(x.view(seeds, config.batch_size, -1) for x in random_batch(seeds * config.batch_size, args.device))
    update = lambda: agent.train(batch)  # noqa: E731
    name = f"cnf_seeds{seeds}"
    report(name, "rl_updates_per_s", rate(update, args.seconds, args.repeats))
    ops = count_ops(update)
    report(name, "aten_ops_per_update", sum(ops.values()) / seeds)
    report(name, "host_syncs_per_update", ops["aten._local_scalar_dense"] / seeds)


def measure_official(args) -> None:
    sys.path.insert(0, str(Path(args.official).resolve()))
    from cnf.actor_critic import Critic, TanhActor  # noqa: E402  (the official package, from --official)
    from cnf.awac import AdvantageWeightedActorCritic
    from cnf.make_flow import make_flow

    device = torch.device(args.device)
    flow = make_flow(device, 12, ACTION_DIM, STATE_DIM, 256, add_atanh=True, uniform_latent=True,
                     state_embedding_mean=torch.zeros(STATE_DIM), state_embedding_std=torch.ones(STATE_DIM))
    states = torch.randn(1024, STATE_DIM, device=device)
    actions = torch.rand(1024, ACTION_DIM, device=device) * 1.8 - 0.9
    flow.log_prob(actions, states)  # ActNorm data init, as its init_flow_act_norm does
    optimizer = torch.optim.AdamW(flow.parameters(), lr=5e-4, weight_decay=1e-4)

    def flow_step():  # the body of its train_flow.optimize_flow
        loss = -flow.log_prob(actions, states).mean()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(flow.parameters(), 1e-1)
        optimizer.step()
        return loss.item(), grad_norm.item()

    report("official_cnf", "flow_steps_per_s", rate(flow_step, args.seconds, args.repeats))

    actor = TanhActor(STATE_DIM, ACTION_DIM, 256, n_layers=4).to(device)
    critic_1 = Critic(STATE_DIM, ACTION_DIM, 256, n_layers=4).to(device)
    critic_2 = Critic(STATE_DIM, ACTION_DIM, 256, n_layers=4).to(device)
    algorithm = AdvantageWeightedActorCritic(
        actor, torch.optim.Adam(actor.parameters(), lr=3e-4),
        critic_1, torch.optim.Adam(critic_1.parameters(), lr=3e-4),
        critic_2, torch.optim.Adam(critic_2.parameters(), lr=3e-4), gamma=0.99, tau=2e-3, awac_lambda=1 / 3, flow=flow)
    s, a, r, s2, d = random_batch(512, args.device)
    update = lambda: algorithm.update(s, a, r, d, s2)  # noqa: E731  (its batch order: s, a, r, done, s')
    report_update("official_cnf", update, args)


def measure_plas(args, compile: bool = False) -> None:
    """PLAS at the official sizes: VAE 750 x 2 (latent 2 x 6), actor and critics 400-300, batch 100. With
    `compile`, the phase-2 update only, through the script's own `compiled` (as `--compile` runs it)."""
    plas = load_algorithm("plas")
    config = plas.TrainConfig(device=args.device, compile=compile)  # the official sizes are the defaults
    vae = plas.ConditionalVAE(ACTION_DIM, STATE_DIM, config.vae_hidden).to(args.device)
    if not compile:
        states = torch.randn(config.vae_batch_size, STATE_DIM, device=args.device)
        actions = torch.rand(config.vae_batch_size, ACTION_DIM, device=args.device) * 1.8 - 0.9
        pretrainer = plas.VAEPretrainer(vae, config)
        report("plas", "vae_steps_per_s", rate(lambda: pretrainer.train(actions, states), args.seconds, args.repeats))

    agent = plas.PLAS(vae, STATE_DIM, ACTION_DIM, config)
    batch = random_batch(config.batch_size, args.device)
    report_update("plas", plas.compiled(lambda: agent.train(batch), config), args, compile)


def measure_awac(args, compile: bool = False) -> None:
    """AWAC at CORL's sizes: actor and critics 4 x 256, batch 256."""
    awac = load_algorithm("awac")
    config = awac.TrainConfig(device=args.device, compile=compile)  # CORL's sizes are the defaults
    agent = awac.AWAC(STATE_DIM, ACTION_DIM, config)
    batch = random_batch(config.batch_size, args.device)
    report_update("awac", awac.compiled(lambda: agent.train(batch), config), args, compile)


def measure_iql(args, compile: bool = False) -> None:
    """IQL at CORL's sizes: policy, Q_1, Q_2 and V 3 x 256, batch 256."""
    iql = load_algorithm("iql")
    config = iql.TrainConfig(device=args.device, compile=compile)  # CORL's sizes are the defaults
    agent = iql.IQL(STATE_DIM, ACTION_DIM, config)
    batch = random_batch(config.batch_size, args.device)
    report_update("iql", iql.compiled(lambda: agent.train(batch), config), args, compile)


def measure_lapo(args, compile: bool = False) -> None:
    """LAPO at the official sizes: CVAE, latent policy, Q_1, Q_2 and V 3 x 256 (latent 2 x 6), batch 512."""
    lapo = load_algorithm("lapo")
    config = lapo.TrainConfig(device=args.device, compile=compile)  # the official sizes are the defaults
    agent = lapo.LAPO(STATE_DIM, ACTION_DIM, config, (0.0, 100.0), torch.zeros(ACTION_DIM), torch.ones(ACTION_DIM))
    batch = random_batch(config.batch_size, args.device)
    report_update("lapo", lapo.compiled(lambda: agent.train(batch), config), args, compile)


def measure_sfbc(args, amp: bool = False, compile: bool = False) -> None:
    """SfBC at the official sizes: behaviour steps, candidate generation, one evaluation step, critic updates.
    With `compile`, the behaviour step and the acting step go through the script's `compiled` (CUDA graphs on a
    GPU), as `--compile` runs them; candidates and critic updates are measured eager only."""
    sfbc = load_algorithm("sfbc")
    name = ("sfbc_compiled" if compile else "sfbc") + ("_bf16" if amp else "")
    config = sfbc.TrainConfig(device=args.device, amp=amp, compile=compile)  # the official sizes are the defaults
    sde = sfbc.VPSDE(config.beta_min, config.beta_max)
    behavior = sfbc.ScoreNetwork(ACTION_DIM, STATE_DIM, config.score_widths, amp).to(args.device)
    states, actions, *_ = random_batch(config.batch_size, args.device)
    trainer = sfbc.BehaviorTrainer(behavior, sde, config)
    step = sfbc.compiled(lambda: trainer.train(states, actions)["behavior/loss"], config)
    report(name, "behaviour_steps_per_s", rate(step, args.seconds, args.repeats))
    if not compile:
        ops = count_ops(step)
        report(name, "aten_ops_per_behaviour_step", sum(ops.values()))
        report(name, "host_syncs_per_behaviour_step", ops["aten._local_scalar_dense"])

    behavior.eval().requires_grad_(False)
    per_pass = config.sampler_batch // config.planning_candidates if args.device.startswith("cuda") else 64
    pass_states = torch.randn(per_pass, STATE_DIM, device=args.device)
    sample = lambda: sfbc.sample_actions(behavior, pass_states, config.planning_candidates, sde, config)  # noqa: E731
    if not compile:
        report(name, "candidate_actions_per_s",
               rate(sample, args.seconds, args.repeats) * per_pass * config.planning_candidates)

    critic = sfbc.Critic(STATE_DIM, ACTION_DIM, config.critic_hidden, amp).to(args.device)
    agent = sfbc.SfBC(behavior, critic, sde, config, select_count=4)
    eval_states = torch.randn(10, STATE_DIM, device=args.device)
    compiled_act = sfbc.compiled(agent.act, config)
    act = lambda: compiled_act(eval_states).cpu()  # noqa: E731  (the evaluation loop reads actions on the host)
    report(name, "eval_step_ms", 1000.0 / rate(act, args.seconds, args.repeats))
    if compile:
        return

    critic_trainer = sfbc.CriticTrainer(critic.requires_grad_(True), config)
    targets = torch.randn(config.batch_size, 1, device=args.device)
    report(name, "critic_updates_per_s", rate(lambda: critic_trainer.train(states, actions, targets), args.seconds,
                                              args.repeats))


def load_corl(corl_dir: str, name: str):
    """CORL's algorithms/offline/<name>.py as module `corl_<name>`. Its top-level `import d4rl, gym` are
    met by empty stub modules for the import only (the trainer never touches them; `gym.Env` is needed
    because its annotations are evaluated at import); pyrallis and wandb are the real packages."""
    import types

    saved = {key: sys.modules.get(key) for key in ("d4rl", "gym")}
    sys.modules["d4rl"] = types.ModuleType("d4rl")
    sys.modules["gym"] = gym = types.ModuleType("gym")
    gym.Env = object
    try:
        path = Path(corl_dir) / "algorithms" / "offline" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"corl_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    finally:
        for key, previous in saved.items():
            if previous is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = previous
    return module


def measure_corl(args) -> None:
    """CORL's AWAC `update(batch)` and IQL `train(batch)` with their default sizes, on the same batch as ours."""
    device = torch.device(args.device)
    adam = lambda module: torch.optim.Adam(module.parameters(), lr=3e-4)  # noqa: E731  (CORL's optimizers)
    corl_awac = load_corl(args.corl, "awac")
    actor = corl_awac.Actor(STATE_DIM, ACTION_DIM, 256).to(device)
    critic_1 = corl_awac.Critic(STATE_DIM, ACTION_DIM, 256).to(device)
    critic_2 = corl_awac.Critic(STATE_DIM, ACTION_DIM, 256).to(device)
    awac_trainer = corl_awac.AdvantageWeightedActorCritic(actor, adam(actor), critic_1, adam(critic_1), critic_2,
                                                          adam(critic_2), gamma=0.99, tau=5e-3, awac_lambda=1.0)
    batch = list(random_batch(256, args.device))  # its order: s, a, r, s', done
    update = lambda: awac_trainer.update(batch)  # noqa: E731
    report_update("corl_awac", update, args)

    corl_iql = load_corl(args.corl, "iql")
    q_network = corl_iql.TwinQ(STATE_DIM, ACTION_DIM).to(device)
    v_network = corl_iql.ValueFunction(STATE_DIM).to(device)
    policy = corl_iql.GaussianPolicy(STATE_DIM, ACTION_DIM, max_action=1.0).to(device)
    iql_trainer = corl_iql.ImplicitQLearning(
        max_action=1.0, actor=policy, actor_optimizer=adam(policy), q_network=q_network, q_optimizer=adam(q_network),
        v_network=v_network, v_optimizer=adam(v_network), iql_tau=0.7, beta=3.0, max_steps=1_000_000,
        discount=0.99, tau=0.005, device=args.device)
    update = lambda: iql_trainer.train(batch)  # noqa: E731
    report_update("corl_iql", update, args)


def main() -> None:
    parser = argparse.ArgumentParser(description="Training throughput, one line per figure.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--official", default=None, help="a checkout of github.com/tinkoff-ai/cnf to compare with")
    parser.add_argument("--corl", default=None,
                        help="a checkout of github.com/corl-team/CORL: also measure its AWAC and IQL")
    parser.add_argument("--amp", action="store_true", help="also measure with bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="also measure every script with --compile")
    parser.add_argument("--cnf_only", action="store_true",
                        help="cnf.py (and --official) only: skip the other algorithms")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one timing round")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# device {args.device}, {args.threads} thread(s), torch {torch.__version__}", flush=True)
    measure_cnf(args, amp=False)
    measure_cnf_seeds(args)
    if args.official:
        measure_official(args)
    if args.compile:
        measure_cnf(args, amp=False, compile=True)
    if args.amp:
        measure_cnf(args, amp=True)
        if args.compile:
            measure_cnf(args, amp=True, compile=True)
    if args.cnf_only:
        return
    for compile in (False, True) if args.compile else (False,):
        measure_plas(args, compile)
        measure_awac(args, compile)
        measure_iql(args, compile)
        measure_lapo(args, compile)
        measure_sfbc(args, compile=compile)
    if args.amp:
        measure_sfbc(args, amp=True)
    if args.corl:
        measure_corl(args)


if __name__ == "__main__":
    main()
