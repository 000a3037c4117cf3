"""How far any finished run's policy strays from the data: its actions scored by a behaviour flow.

Companion to Akimov et al., "Let Offline RL Flow: Training Conservative Agents in the Latent Space
of Normalizing Flows" (arXiv 2211.11096): the mechanism behind Figs. 3, 5 and 6 (CNF's bounded latent
keeps the policy's actions in the data's support; a Normal latent lets it leave), measured for every
algorithm with one yardstick.

    python algorithms/behavior_likelihood.py RUN_DIR [RUN_DIR ...] --flow FLOW.pt [--out FILE.json]
    python algorithms/behavior_likelihood.py runs/awac-* runs/iql-* runs/cnf-* --flow runs/cnf-*/flow.pt

FLOW.pt is the flow.pt of a cnf.py run on the same dataset (a cnf_normal_ablation.py flow.pt works too:
then the yardstick is that Normal-latent flow). For each run directory the tool rebuilds the run's final
policy (the last checkpoint.pt; a run stopped early is scored at its last checkpoint, and says so). It
*imports the algorithm file that trained the run* (algorithms/<ALGORITHM>.py, found from results.json
or, like report.py does, from the directory name or config.yaml's fields) and uses its own pieces:
TrainConfig read from the run's config.yaml, `load_offline_data(config)` and `ReplayBuffer` (the data is
re-loaded: the policy normalises states with the data's statistics, and PLAS's raw states and LAPO's
z-scores are rebuilt as the script builds them), the phase-1 model (flow.pt / vae.pt / behavior.pt)
and the agent class, then `load_state_dict(checkpoint["agent"])`. AWAC, IQL, PLAS, CNF-VAE, CNF,
cnf_normal_ablation, cnf_latent_only, LAPO and SfBC are known; a run whose file lacks what is needed is
skipped with a `skipped:` line.

The figures are cnf.py's in-run diagnostic (`BehaviourLikelihood`, see its docstring), applied to the
policy's evaluation action (`agent.act`, as in the run's evaluations) at a fixed sample of dataset states
(--n_states, drawn from --seed; the in-run diagnostic draws from the run's seed, so a seed-0 CNF run
scored under its own flow.pt at --seed 0 reproduces its last diag/* line of metrics.jsonl):
- policy_nll: mean -log pi_beta(a | s) under the behaviour flow; data_nll: the dataset's own actions'
  at the same states (the reference);
- ood_rate: the fraction of the policy's actions whose log-likelihood is below the data's 1st percentile
  (about 0.01 for data-like actions);
- latent_abs_max and per-dimension latent histograms, for the flow policies (CNF and its ablations):
  the policy's own latents, in its own flow.
SfBC's acting samples (diffusion candidates, a Gumbel draw); it is scored under torch.manual_seed(--seed).
A run trained with --amp scored its in-run diagnostic with bfloat16 conditioners; this tool's flow is
float32 (--amp to match), so its numbers differ from the in-run ones in the last digits.

--episodes N also runs the final policy for N episodes in the run's evaluation env, seeded as the run's
evaluations are (its seed, its cpu_threads; N = its eval_episodes replays its final evaluation), and
reports how long its episodes last beside their normalised scores: a policy that scores under the data
can be told apart as one that falls early (short episodes) or one that survives but moves slowly
(full-length, low return).

Prints one line per run and a table; --out writes the numbers as JSON. Bad input (a missing file, a
flow for another state or action size, a run without a phase-2 checkpoint) is one `error:` line.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

ALGORITHMS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(ALGORITHMS_DIR))
OPTIONAL = ("lapo", "sfbc")  # files that may be absent or change their API: skipped, not an error


class Skip(Exception):
    """A run this tool cannot score; it is reported in one `skipped:` line and the others go on."""


# %% The behaviour flow
def load_behaviour_flow(path: str, amp: bool, device: str):
    """FLOW.pt -> (flow in eval mode, state_mean, state_std, the module that defines its BehaviourLikelihood)."""
    if not Path(path).is_file():
        raise SystemExit(f"error: --flow {path} does not exist")
    import cnf

    saved = cnf.torch_load(path)
    if not isinstance(saved, dict) or not {"flow", "sizes", "state_mean", "state_std"} <= saved.keys():
        raise SystemExit(f"error: --flow {path} is not a flow.pt written by cnf.py or its ablations "
                         f"(it lacks flow, sizes, state_mean or state_std)")
    base = saved.get("base_distribution", "uniform")
    if base == "uniform":
        module, flow_class = cnf, cnf.ConditionalFlow
    elif base == "normal":
        import cnf_normal_ablation as module

        flow_class = module.NormalConditionalFlow
    else:
        raise SystemExit(f"error: --flow {path} has a {base!r} latent; expected a uniform or normal one")
    flow = flow_class(**saved["sizes"], amp=amp)
    flow.load_state_dict(saved["flow"])
    flow.to(device).eval().requires_grad_(False)
    return flow, saved["state_mean"].numpy(), saved["state_std"].numpy(), module


# %% Rebuilding a run's policy
def run_algorithm(run_dir: Path, config: dict) -> str:
    results = run_dir / "results.json"
    if results.is_file():
        try:
            return json.loads(results.read_text())["algorithm"]
        except (ValueError, KeyError, TypeError):
            pass
    import report

    algorithm = report.infer_algorithm(run_dir, config, report.known_algorithms())
    if algorithm is None:
        raise SystemExit(f"error: {run_dir}: cannot tell which algorithm trained it (no results.json, and neither "
                         f"the directory name nor config.yaml's fields name one)")
    return algorithm


def phase_1_file(run_dir: Path, configured: Optional[str], name: str) -> str:
    """The phase-1 model the run used: --flow_checkpoint / --vae_checkpoint if it had one, else RUN_DIR/<name>."""
    return configured if configured is not None else str(run_dir / name)


def build_agent(algorithm: str, module, config, data, run_dir: Path, checkpoint: dict):
    """(the run's ReplayBuffer, its agent with the checkpoint's weights), as algorithms/<algorithm>.py's
    train(config) builds them."""
    buffer = module.ReplayBuffer(data, config.device)
    state_dim, action_dim = buffer.states.shape[1], buffer.actions.shape[1]
    if algorithm == "awac":
        agent = module.AWAC(state_dim, action_dim, config)
    elif algorithm == "iql":
        agent = module.IQL(state_dim, action_dim, config)
    elif algorithm in ("plas", "cnf_vae"):
        if algorithm == "plas" and not config.normalize_states:
            module.use_raw_states(buffer, data)
        vae = module.load_vae(phase_1_file(run_dir, config.vae_checkpoint, "vae.pt"), buffer, config.device)
        agent = (module.PLAS if algorithm == "plas" else module.CNFVAE)(vae, state_dim, action_dim, config)
    elif algorithm in ("cnf", "cnf_normal_ablation", "cnf_latent_only"):
        flow = module.load_flow(phase_1_file(run_dir, config.flow_checkpoint, "flow.pt"), buffer, config.device,
                                config.amp)
        agent_class = {"cnf": "CNF", "cnf_normal_ablation": "NormalLatentCNF", "cnf_latent_only": "LatentOnlyCNF"}
        agent = getattr(module, agent_class[algorithm])(flow, state_dim, action_dim, config)
    elif algorithm == "lapo":
        data, info = module.scale_rewards(data, config.reward_scaling, config.gamma)
        buffer = module.ReplayBuffer(data, config.device)
        action_mean, action_std = module.zscore(buffer, data)
        agent = module.LAPO(state_dim, action_dim, config, (info["value_min"], info["value_max"]), action_mean,
                            action_std)
    elif algorithm == "sfbc":
        behavior = module.ScoreNetwork(action_dim, state_dim, config.score_widths, config.amp).to(config.device)
        behavior.load_state_dict(module.torch_load(run_dir / "behavior.pt")["model"])
        behavior.eval().requires_grad_(False)
        critic = module.Critic(state_dim, action_dim, config.critic_hidden, config.amp).to(config.device)
        critic.load_state_dict(checkpoint["critic"]["critic"])
        select_count = config.select_count or (4 if module.LOCOMOTION_NAME.match(data.name) else 1)
        return buffer, module.SfBC(behavior, critic, module.VPSDE(config.beta_min, config.beta_max), config,
                                   select_count)
    else:
        raise Skip(f"this tool does not know how to rebuild a {algorithm} policy")
    agent.load_state_dict(checkpoint["agent"])
    return buffer, agent


def policy_of(agent, module) -> Callable:
    """states -> (actions, latents or None): the evaluation action; a flow policy also gives its latents."""
    if hasattr(module, "latent_policy") and hasattr(agent, "flow"):
        return module.latent_policy(agent)
    return lambda states: (agent.act(states), None)


def load_run(run_dir: Path, device: str, dataset_path: Optional[str] = None) -> tuple:
    """(algorithm, its module, its TrainConfig, its last checkpoint, its data) of a run that reached phase 2;
    `dataset_path` reads another file than the run's config names. Raises Skip or SystemExit."""
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"error: {run_dir} is not a run directory (no config.yaml)")
    if not (run_dir / "checkpoint.pt").is_file():
        raise SystemExit(f"error: {run_dir} has no checkpoint.pt (the run saved no agent)")
    import yaml

    algorithm = run_algorithm(run_dir, yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    if not (ALGORITHMS_DIR / f"{algorithm}.py").is_file():
        raise Skip(f"algorithms/{algorithm}.py does not exist")
    module = importlib.import_module(algorithm)
    config = module.load_yaml_config(module.TrainConfig, str(run_dir / "config.yaml"), f"{run_dir}/config.yaml")
    config = replace(config, device=device, resume=None)
    if dataset_path is not None:
        config = replace(config, dataset_path=dataset_path)
    checkpoint = module.torch_load(run_dir / "checkpoint.pt")
    if checkpoint.get("phase") != "rl":
        raise SystemExit(f"error: {run_dir} stopped in phase {checkpoint.get('phase')!r} at step "
                         f"{checkpoint.get('step')}: it has no agent yet; continue it with "
                         f"python algorithms/{algorithm}.py --resume {run_dir}")
    return algorithm, module, config, checkpoint, module.load_offline_data(config)


def score_run(run_dir: Path, flow, flow_mean: np.ndarray, flow_std: np.ndarray, flow_module, args) -> dict:
    """Rebuild one run's final policy and score it; raises Skip or SystemExit."""
    algorithm, module, config, checkpoint, data = load_run(run_dir, args.device)
    state_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    if (flow.state_dim, flow.action_dim) != (state_dim, action_dim):
        raise SystemExit(f"error: --flow {args.flow} was trained for {flow.action_dim}-dim actions and "
                         f"{flow.state_dim}-dim states; {run_dir}'s data ({data.name}) has {action_dim} and "
                         f"{state_dim}")
    if not np.allclose(flow_mean, data.observations.mean(0), atol=1e-4):
        print(f"warning: --flow {args.flow} was trained on other states than {run_dir}'s data ({data.name}): "
              f"another dataset?", file=sys.stderr)
    try:
        buffer, agent = build_agent(algorithm, module, config, data, run_dir, checkpoint)
    except Skip:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        if algorithm in OPTIONAL:
            raise Skip(f"cannot rebuild its policy from algorithms/{algorithm}.py ({detail})") from None
        raise SystemExit(f"error: {run_dir}: checkpoint.pt does not fit algorithms/{algorithm}.py's agent "
                         f"({detail})") from None

    # The behaviour flow's view of the data: states normalised as the flow saw them (flow.pt's statistics).
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=args.device)  # noqa: E731
    flow_states = as_tensor((data.observations - flow_mean) / flow_std)
    diagnostic = flow_module.BehaviourLikelihood(flow, flow_states, as_tensor(data.actions), args.seed,
                                                 n_states=args.n_states)
    torch.manual_seed(args.seed)  # SfBC's acting samples
    out = diagnostic.measure(policy_of(agent, module), buffer.states[diagnostic.indices])
    counts = out.pop("latent_counts", None)
    total_steps = (config.planning_rounds * config.critic_steps if algorithm == "sfbc" else config.train_steps)
    result = {"run": str(run_dir), "algorithm": algorithm, "dataset": data.name, "seed": config.seed,
              "step": int(checkpoint["step"]), "final": int(checkpoint["step"]) == total_steps,
              **{key.split("/")[1]: float(value) for key, value in out.items()}}
    if counts is not None:
        result.update({"edges": list(flow_module.LATENT_EDGES), "latent_counts": counts.tolist()})
    if args.episodes:
        result.update(own_episodes(module, data, buffer, agent, args.episodes, config))
    return result


class EpisodeLengths:
    """A vector env that counts each of its episodes' steps until the episode first ends."""

    def __init__(self, envs, episodes: int):
        self.envs, self.lengths, self.running = envs, np.zeros(episodes, dtype=int), np.ones(episodes, dtype=bool)

    def reset(self, **kwargs):
        return self.envs.reset(**kwargs)

    def step(self, actions):
        out = self.envs.step(actions)
        self.lengths += self.running
        self.running &= ~np.asarray((out[2] | out[3]) if len(out) == 5 else out[2], dtype=bool)  # Gymnasium; gym
        return out

    def close(self):
        self.envs.close()


def own_episodes(module, data, buffer, agent, episodes: int, config) -> dict:
    """The final policy's episodes, run by the algorithm file's own `evaluate` with the run's seed and CPU thread
    count (the same float sums, so the same episodes as its evaluations): each one's length and normalised score."""
    counter = EpisodeLengths(data.make_eval_env(episodes), episodes)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.cpu_threads or threads)
    try:
        returns = module.evaluate(lambda n: counter, agent.act, buffer.state_mean, buffer.state_std, episodes,
                                  config.seed, config.device)
    finally:
        torch.set_num_threads(threads)
    return {"episode_lengths": counter.lengths.tolist(), "episode_scores": data.normalize_score(returns).tolist()}


# %% The command line
def table(results: Sequence[dict]) -> list:
    episodes = any("episode_lengths" in r for r in results)
    lines = ["| run | algorithm | dataset | step | policy NLL | data NLL | OOD rate | max abs latent |"
             + (" score | episode length: min, median, max |" if episodes else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if episodes else "")]
    for r in results:
        latent = f"{r['latent_abs_max']:.2f}" if "latent_abs_max" in r else "-"
        step = f"{r['step']}" + ("" if r["final"] else " (not final)")
        lines.append(f"| {r['run']} | {r['algorithm']} | {r['dataset']} | {step} | {r['policy_nll']:.3f} "
                     f"| {r['data_nll']:.3f} | {100 * r['ood_rate']:.1f}% | {latent} |"
                     + (f" {np.mean(r['episode_scores']):.1f} | {lengths_summary(r)} |" if episodes else ""))
    return lines


def lengths_summary(result: dict) -> str:
    """min, median, max of a run's own episode lengths."""
    lengths = result["episode_lengths"]
    return f"{min(lengths)}, {np.median(lengths):g}, {max(lengths)}"


def main(argv: Optional[Sequence[str]] = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (config.yaml and checkpoint.pt)")
    parser.add_argument("--flow", required=True, help="the behaviour flow: flow.pt of a cnf.py run on the same data")
    parser.add_argument("--out", default=None, help="write the numbers (and latent histograms) to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset-state sample (runs use their own)")
    parser.add_argument("--n_states", type=int, default=10_000, help="dataset states in the sample (all if fewer)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--episodes", type=int, default=0,
                        help="also run the final policy for this many episodes and report their lengths")
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 conditioners in the behaviour flow (as runs trained with --amp)")
    args = parser.parse_args(argv)
    if args.n_states < 1:
        raise SystemExit(f"error: --n_states {args.n_states} is not allowed: at least 1")
    if args.episodes < 0:
        raise SystemExit(f"error: --episodes {args.episodes} is not allowed: 0 (none) or more")
    for run in args.runs:
        if not Path(run).is_dir():
            raise SystemExit(f"error: {run} is not a directory")
    flow, flow_mean, flow_std, flow_module = load_behaviour_flow(args.flow, args.amp, args.device)
    results, skipped = [], []
    for run in args.runs:
        try:
            result = score_run(Path(run), flow, flow_mean, flow_std, flow_module, args)
        except Skip as reason:
            print(f"skipped: {run}: {reason}", file=sys.stderr)
            skipped.append({"run": run, "reason": str(reason)})
            continue
        results.append(result)
        latent = f"  max |z| {result['latent_abs_max']:.2f}" if "latent_abs_max" in result else ""
        print(f"{run}: {result['algorithm']} at step {result['step']}{'' if result['final'] else ' (not final)'}  "
              f"policy NLL {result['policy_nll']:.3f} (data {result['data_nll']:.3f})  "
              f"OOD rate {100 * result['ood_rate']:.1f}%{latent}"
              + (f"  {len(result['episode_lengths'])} episodes: score {np.mean(result['episode_scores']):.1f}, "
                 f"lengths {lengths_summary(result)}" if "episode_lengths" in result else ""))
    print("\n".join(["", *table(results)]) if results else "no run could be scored")
    if args.out is not None:
        Path(args.out).write_text(json.dumps({"flow": args.flow, "seed": args.seed, "n_states": args.n_states,
                                              "runs": results, "skipped": skipped}, indent=1))
        print(f"behaviour likelihood: {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
