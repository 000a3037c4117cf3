"""How a finished run's critic values the states before the data's falls.

Companion to Akimov et al., "Let Offline RL Flow" (arXiv 2211.11096) and its baselines: an offline critic
learns that a fall is worth little only from the falls in the data (the transitions with `terminals`), so a
dataset with few falls can leave the states before a fall overvalued, and a policy that maximises that critic
steers into them. This tool measures it for any finished run whose agent has twin critics (AWAC, IQL, PLAS,
LAPO, CNF, CNF-VAE and the flow ablations):

    python algorithms/critic_calibration.py RUN_DIR [RUN_DIR ...] [--dataset_path FILE] [--out FILE.json]

For every transition of the episodes that end in a fall it compares Q(s, a) at the data's own action (the
minimum of the twin critics, as the targets use it) with the data's discounted return-to-go from s (the run's
gamma, in the rewards the run trained on: the `--reward_scaling` of iql.py, awac.py and lapo.py applied as the run
applied it), binned by the steps left before the fall (--bins). These returns are exact: the episodes end in a
terminal, nothing is cut by a time limit. Q is the value of the run's own policy, which may differ from the
behaviour's (IQL's is an upper expectile of the data's values, so somewhat above them by design); a ratio
Q / return-to-go well above 1 in the last bins before a fall says the critic expects its policy to recover
where the data's did not, and the far bin (more steps left) is the critic's calibration away from the falls.

The run is rebuilt as behavior_likelihood.py rebuilds it (the algorithm file's own TrainConfig, data and agent;
its last checkpoint.pt). --dataset_path scores the critic on another file than its config names (e.g. a
run whose bundled dataset was regenerated since). Prints one line per bin and run, and a table; bad input
is one `error:` line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

ALGORITHMS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(ALGORITHMS_DIR))
import behavior_likelihood  # noqa: E402 (after its folder is on the path)

DEFAULT_BINS = "0,1,6,21,101"  # bin lower edges in steps before the fall: [0], [1, 5], [6, 20], [21, 100], 101+


def returns_to_go_before_falls(rewards: np.ndarray, terminals: np.ndarray, episode_ends: np.ndarray,
                               gamma: float) -> tuple:
    """For every transition of an episode that ends in a terminal: (its index, steps left before the terminal
    transition (0 at the terminal one), its discounted return-to-go sum_k gamma^k r_{t+k} up to the terminal)."""
    indices, steps_left, returns = [], [], []
    starts = np.concatenate([[0], np.flatnonzero(episode_ends)[:-1] + 1])
    for start, end in zip(starts, np.flatnonzero(episode_ends)):
        if not terminals[end]:
            continue
        episode = rewards[start:end + 1].astype(np.float64)
        discounts = gamma ** np.arange(len(episode))
        # G_t = sum_{k >= t} gamma^(k - t) r_k, from the reversed cumulative sum of the discounted rewards
        returns.append(np.cumsum((episode * discounts)[::-1])[::-1] / discounts)
        indices.append(np.arange(start, end + 1))
        steps_left.append(np.arange(end - start, -1, -1))
    if not indices:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    return np.concatenate(indices), np.concatenate(steps_left), np.concatenate(returns)


def episode_ends(data) -> np.ndarray:
    """Where each episode ends: a terminal, or where the next row does not start from this one's next observation
    (a time limit, the file's end)."""
    ends = data.dones > 0
    ends[:-1] |= (data.next_observations[:-1] != data.observations[1:]).any(axis=1)
    ends[-1] = True
    return ends


def rebuild(run_dir: Path, dataset_path: Optional[str], device: str):
    """(algorithm, its config, its data with the rewards it trained on, its ReplayBuffer, its twin critic [2, B, 1],
    the checkpoint's step) from a finished run."""
    algorithm, module, config, checkpoint, data = behavior_likelihood.load_run(run_dir, device, dataset_path)
    buffer, agent = behavior_likelihood.build_agent(algorithm, module, config, data, run_dir, checkpoint)
    critic = getattr(agent, "critic", None)
    critic = critic.q if algorithm == "lapo" else critic  # LAPO's Critics holds its twin Q beside V
    if not isinstance(critic, torch.nn.Module):
        raise behavior_likelihood.Skip(f"{algorithm}'s agent has no twin critic Q(s, a)")
    if algorithm in ("iql", "awac"):  # the rewards its critic learned (CORL's reward modification)
        data = module.scale_rewards(data, config.reward_scaling)[0]
    elif algorithm == "lapo":
        data = module.scale_rewards(data, config.reward_scaling, config.gamma)[0]
    return algorithm, config, data, buffer, critic, int(checkpoint["step"])


@torch.no_grad()
def critic_values(critic: torch.nn.Module, states: torch.Tensor, actions: torch.Tensor,
                  chunk: int = 65_536) -> np.ndarray:
    """min_j Q_j(s, a) for every row, in chunks: [N]."""
    return torch.cat([critic(s, a).min(0).values.reshape(-1).float().cpu()
                      for s, a in zip(states.split(chunk), actions.split(chunk))]).numpy()


def calibrate(run_dir: Path, bins: Sequence[int], dataset_path: Optional[str], device: str) -> dict:
    algorithm, config, data, buffer, critic, step = rebuild(run_dir, dataset_path, device)
    indices, steps_left, returns = returns_to_go_before_falls(data.rewards, data.dones > 0, episode_ends(data),
                                                              config.gamma)
    if len(indices) == 0:
        raise SystemExit(f"error: {data.name} has no episode that ends in a terminal: there is no fall to measure")
    index = torch.as_tensor(indices, device=buffer.states.device)
    q = critic_values(critic, buffer.states[index], buffer.actions[index])
    rows = []
    for low, high in zip(bins, [*bins[1:], None]):
        mask = (steps_left >= low) & (steps_left < high if high is not None else True)
        if mask.any():
            rows.append({"steps_left": [low, None if high is None else high - 1], "n": int(mask.sum()),
                         "q": float(q[mask].mean()), "return_to_go": float(returns[mask].mean())})
    return {"run": str(run_dir), "algorithm": algorithm, "dataset": data.name, "step": step,
            "falls": int((data.dones > 0).sum()), "gamma": config.gamma, "bins": rows}


def bin_label(row: dict) -> str:
    low, high = row["steps_left"]
    return f"{low}+" if high is None else f"{low}" if low == high else f"{low}-{high}"


def table(results: Sequence[dict]) -> list:
    labels = [bin_label(row) for row in results[0]["bins"]]
    lines = ["| run | algorithm | dataset | step | falls | " + " | ".join(f"{b} steps left: Q / G" for b in labels)
             + " |", "|---|---|---|---|---|" + "---|" * len(labels)]
    for r in results:
        cells = {bin_label(row): f"{row['q']:.1f} / {row['return_to_go']:.1f}" for row in r["bins"]}
        lines.append(f"| {r['run']} | {r['algorithm']} | {r['dataset']} | {r['step']} | {r['falls']} | "
                     + " | ".join(cells.get(b, "-") for b in labels) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (config.yaml and checkpoint.pt)")
    parser.add_argument("--dataset_path", default=None, help="score on this HDF5 file instead of the run's data")
    parser.add_argument("--bins", default=DEFAULT_BINS, help="increasing lower edges of the steps-left bins")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        bins = [int(b) for b in args.bins.split(",")]
    except ValueError:
        raise SystemExit(f"error: --bins {args.bins!r} is not a comma-separated list of whole numbers") from None
    if bins[0] != 0 or any(b <= a for a, b in zip(bins, bins[1:])):
        raise SystemExit(f"error: --bins {args.bins!r} must start at 0 and increase, e.g. {DEFAULT_BINS}")
    if args.dataset_path is not None and not Path(args.dataset_path).is_file():
        raise SystemExit(f"error: --dataset_path {args.dataset_path} does not exist")
    for run in args.runs:
        if not Path(run).is_dir():
            raise SystemExit(f"error: {run} is not a directory")
    results = []
    for run in args.runs:
        try:
            result = calibrate(Path(run), bins, args.dataset_path, args.device)
        except behavior_likelihood.Skip as reason:
            print(f"skipped: {run}: {reason}", file=sys.stderr)
            continue
        results.append(result)
        for row in result["bins"]:
            print(f"{run}: {result['algorithm']} at step {result['step']}, {bin_label(row)} steps before a fall "
                  f"(n={row['n']}): Q {row['q']:.2f}, return-to-go {row['return_to_go']:.2f}")
    print("\n".join(["", *table(results)]) if results else "no run could be scored")
    if args.out is not None:
        Path(args.out).write_text(json.dumps({"bins": bins, "runs": results}, indent=1))
        print(f"critic calibration: {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
