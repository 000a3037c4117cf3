"""Train the behaviour policies that data/generate.py rolls out, following D4RL's recipe.

D4RL trained SAC (rlkit, tanh-Gaussian actor, 2 x 256 ReLU) and kept snapshots: "medium" is a
policy at about a third of expert return, "medium-replay" is the whole replay buffer up to that
point, "expert" a fully trained policy. This script does the same on Gymnasium MuJoCo with
stable-baselines3's SAC (same actor family: 2 x 256 ReLU, tanh-squashed Gaussian):

    python data/train_behavior.py --env HalfCheetah-v5 --total_steps 300000 --out data/policies

Every `--eval_every` environment steps it evaluates the *stochastic* policy (D4RL's datasets were
collected with stochastic actions) over `--eval_episodes` episodes and keeps the actor as a
candidate. After every evaluation it (re)writes, into `--out`:

- `<env>-medium.pt`: the medium snapshot. Every snapshot whose normalised return lies within
  `--confirm_within` (10) points of D4RL's medium dataset (MEDIUM_TARGETS below) is re-measured on
  `--confirm_episodes` (20) more episodes; it is a candidate only if that confirmation lies within 3
  normalised points of D4RL's mean AND within a factor 1.5 of D4RL's coefficient of variation of episode
  returns (D4RL_MEDIUM_STATS; a 5-episode mean is too noisy to trust, and a policy that mostly falls early
  but sometimes runs to the time limit can hit the mean with twice D4RL's spread). Among candidates the
  one closest to D4RL's level is kept; until one passes, no medium policy is written. `--stop_when_found`
  ends training at the first that passes; `--confirm_episodes 0` is the old rule (closest on 5 episodes).
  How many episodes: a confirmation's mean errs by about std / sqrt(n); Hopper's 20 sufficed, Walker2d's
  returns (std about 20 normalised points) needed 500 before a passing snapshot's file passed too;
- `<env>-medium-replay.hdf5`: the replay buffer up to that candidate's step, in D4RL's format;
- `<env>-expert.pt`: the best candidate, only if it reaches EXPERT_FRACTION of D4RL's expert
  normalised score;
- `<env>-training.json`: every evaluation (step, mean, std; the confirmation's mean, std, normalised
  score, CV and verdict), the bands, and which candidates were kept.

`--evaluate` re-measures an exported policy (mean, std, CV and the bands' verdict), `--file_stats` a
generated file's whole episodes (the same, and the episode lengths):

    python data/train_behavior.py --env Hopper-v5 --evaluate data/policies/hopper-medium.pt --eval_episodes 20
    python data/train_behavior.py --env Hopper-v5 --file_stats hopper-medium-gymv5.hdf5

Policies are exported as plain torch state_dicts of `data.generate.BehaviorPolicy` (small .pt
files, loadable with `torch.load(..., weights_only=True)` and no stable-baselines3).
stable-baselines3 is needed by this script only; install it with `pip install stable-baselines3`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.generate import (MAX_EPISODE_STEPS, REFERENCE_SCORES, BehaviorPolicy, normalized_score,  # noqa: E402
                           write_d4rl_hdf5)

# D4RL's v2 medium datasets, whole episodes of the 1M-step files (split at terminals and timeouts):
# (episodes, mean return, std of the returns). Mean and std: the output of Decision Transformer's
# gym/data/download_d4rl_datasets.py (github.com/kzl/decision-transformer) on the v2 files, as recorded in
# public copies of it; episodes: the rows of the same trajectories on the Hugging Face Hub
# (huggingface.co/datasets/edbeeching/decision_transformer_gym_replay: 1k, 2.19k, 1.19k). See data/README.md.
D4RL_MEDIUM_STATS = {"HalfCheetah-v5": (1000, 4770.335, 355.7504), "Hopper-v5": (2186, 1422.0562, 378.9537),
                     "Walker2d-v5": (1190, 2852.0884, 1095.4434)}
# The medium criterion: a snapshot is a medium candidate only if its confirmation (>= MIN_CONFIRM episodes)
# lands within MEAN_BAND normalised points of D4RL's mean and within a factor CV_FACTOR of D4RL's
# coefficient of variation of episode returns (CV = std / mean). D4RL's medium data come from one partially
# trained SAC policy each (CVs 0.075, 0.266, 0.384); a snapshot that mostly falls early but sometimes hops to
# the time limit can match the mean with returns spread twice as widely.
MEAN_BAND, CV_FACTOR, MIN_CONFIRM = 3.0, 1.5, 20
# Normalised scores (x 100) of those means: the level a "medium" policy is kept at (40.7, 44.3, 62.1).
MEDIUM_TARGETS = {env: float(normalized_score(env, mean)) for env, (_, mean, _) in D4RL_MEDIUM_STATS.items()}
D4RL_MEDIUM_CV = {env: std / mean for env, (_, mean, std) in D4RL_MEDIUM_STATS.items()}
# D4RL's expert datasets score about 89 (halfcheetah), 109 (hopper), 107 (walker2d).
EXPERT_TARGETS = {"HalfCheetah-v5": 88.9, "Hopper-v5": 108.5, "Walker2d-v5": 106.9}
EXPERT_FRACTION = 0.9


def export_actor(model) -> dict:
    """SB3's SAC actor -> BehaviorPolicy state_dict (latent_pi MLP, mu and log_std heads)."""
    sb3 = {k: v.detach().cpu().clone() for k, v in model.actor.state_dict().items()}
    state = {
        "trunk.0.weight": sb3["latent_pi.0.weight"], "trunk.0.bias": sb3["latent_pi.0.bias"],
        "trunk.2.weight": sb3["latent_pi.2.weight"], "trunk.2.bias": sb3["latent_pi.2.bias"],
        "mean.weight": sb3["mu.weight"], "mean.bias": sb3["mu.bias"],
        "log_std.weight": sb3["log_std.weight"], "log_std.bias": sb3["log_std.bias"],
    }
    policy = BehaviorPolicy(state["trunk.0.weight"].shape[1], state["mean.weight"].shape[0])
    policy.load_state_dict(state)  # checks the mapping is complete
    return policy.state_dict()


def medium_score(evaluation: dict) -> float:
    """An evaluation's normalised score for choosing the medium policy: the confirmed one if measured."""
    return evaluation.get("confirmed_normalized", evaluation["normalized"])


def closest_to(evaluations: list, target: float) -> dict:
    return min(evaluations, key=lambda e: abs(medium_score(e) - target))


def medium_bands(env_id: str) -> dict:
    """The accepted ranges: normalised mean return and CV of episode returns, around D4RL's medium data."""
    target, cv = MEDIUM_TARGETS[env_id], D4RL_MEDIUM_CV[env_id]
    return {"normalized": (target - MEAN_BAND, target + MEAN_BAND), "cv": (cv / CV_FACTOR, cv * CV_FACTOR)}


def band_check(env_id: str, returns) -> dict:
    """Mean, std, CV and normalised score of episode returns, and whether each lies in D4RL's medium bands
    (`passes` also needs at least MIN_CONFIRM episodes)."""
    returns = np.asarray(returns, dtype=float)
    mean, std = float(returns.mean()), float(returns.std())
    score, cv = float(normalized_score(env_id, mean)), std / abs(mean) if mean else float("inf")
    bands = medium_bands(env_id)
    mean_ok = bands["normalized"][0] <= score <= bands["normalized"][1]
    cv_ok = bands["cv"][0] <= cv <= bands["cv"][1]
    return {"episodes": len(returns), "return_mean": mean, "return_std": std, "normalized": score, "cv": cv,
            "mean_in_band": mean_ok, "cv_in_band": cv_ok,
            "passes": bool(mean_ok and cv_ok and len(returns) >= MIN_CONFIRM)}


def choose_medium(evaluations: list, env_id: str):
    """The medium snapshot: among evaluations whose confirmation passes both bands, the one closest to
    D4RL's level; None while none passes."""
    passing = [e for e in evaluations if e.get("confirmed_passes")]
    return closest_to(passing, MEDIUM_TARGETS[env_id]) if passing else None


def file_episodes(path: str):
    """Returns and lengths of the whole episodes of a D4RL-layout file: those that end by termination or
    at the time limit (each environment's last, cut-off episode of a generated file is left out, as
    data/generate.py leaves it out of the return it prints)."""
    import h5py

    with h5py.File(path, "r") as f:
        rewards, terminals = f["rewards"][:], f["terminals"][:].astype(bool)
        ends = np.flatnonzero(terminals | f["timeouts"][:].astype(bool))
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(int)
    lengths = ends - starts + 1
    whole = terminals[ends] | (lengths == MAX_EPISODE_STEPS)
    returns = np.add.reduceat(rewards.astype(np.float64), starts)[whole] if len(ends) else np.zeros(0)
    return returns, lengths[whole]


def describe(env_id: str, returns, what: str) -> str:
    """One line: mean +- std, normalised score, CV and the verdict of D4RL's medium bands."""
    check, bands = band_check(env_id, returns), medium_bands(env_id)
    verdict = ("passes" if check["passes"] else "fails" if len(returns) >= MIN_CONFIRM
               else f"not judged (needs {MIN_CONFIRM} episodes)")
    return (f"{what} on {env_id}: return {check['return_mean']:.1f} +- {check['return_std']:.1f} over "
            f"{len(returns)} episodes, normalised {check['normalized']:.1f}, CV {check['cv']:.3f}; "
            f"D4RL medium bands (normalised {bands['normalized'][0]:.1f}-{bands['normalized'][1]:.1f}: "
            f"{'in' if check['mean_in_band'] else 'out'}, CV {bands['cv'][0]:.3f}-{bands['cv'][1]:.3f}: "
            f"{'in' if check['cv_in_band'] else 'out'}): {verdict}")


def evaluate(env_id: str, state_dict: dict, episodes: int, seed: int) -> np.ndarray:
    import gymnasium as gym

    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(episodes)])
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    if state_dict["trunk.0.weight"].shape[1] != obs_dim or state_dict["mean.weight"].shape[0] != act_dim:
        raise SystemExit(f"error: the policy's shapes do not fit {env_id} (observation {obs_dim}, action "
                         f"{act_dim}); pass the --env it was trained on")
    policy = BehaviorPolicy(obs_dim, act_dim)
    policy.load_state_dict(state_dict)
    generator = torch.Generator().manual_seed(seed)
    obs, _ = envs.reset(seed=seed)
    returns, done = np.zeros(episodes), np.zeros(episodes, dtype=bool)
    while not done.all():
        with torch.no_grad():
            action = policy.sample(torch.as_tensor(obs, dtype=torch.float32), generator).numpy()
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += reward * ~done
        done |= terminated | truncated
    envs.close()
    return returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="HalfCheetah-v5", choices=sorted(MEDIUM_TARGETS))
    parser.add_argument("--total_steps", type=int, default=300_000)
    parser.add_argument("--eval_every", type=int, default=5_000)
    parser.add_argument("--eval_episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies"))
    parser.add_argument("--confirm_episodes", type=int, default=MIN_CONFIRM,
                        help=f"re-measure every snapshot that scores within --confirm_within of D4RL's medium level "
                             f"on this many more episodes (at least {MIN_CONFIRM}); only a snapshot whose confirmation "
                             "lies in both bands (mean return and CV) can become the medium policy. 0: the old rule, "
                             "the snapshot closest on the --eval_episodes score alone, no bands")
    parser.add_argument("--confirm_within", type=float, default=10.0,
                        help="normalised points around D4RL's medium level inside which a snapshot is confirmed "
                             "(a 5-episode mean of a policy with D4RL's spread errs by about 5 points on Hopper, "
                             "10 on Walker2d)")
    parser.add_argument("--stop_when_found", action="store_true",
                        help="stop training at the first snapshot that passes both bands (its outputs are written)")
    parser.add_argument("--evaluate", metavar="POLICY_PT", default=None,
                        help="only evaluate this exported policy: --eval_episodes episodes from --seed, "
                             "stochastic actions (no stable-baselines3 needed)")
    parser.add_argument("--file_stats", metavar="HDF5", default=None,
                        help="only print the whole-episode statistics of a D4RL-layout file (a generated one: "
                             "data/generate.py --out) against D4RL's medium bands for --env")
    args = parser.parse_args()
    if 0 < args.confirm_episodes < MIN_CONFIRM:
        parser.error(f"--confirm_episodes must be 0 or at least {MIN_CONFIRM}")
    torch.set_num_threads(1)
    if args.evaluate is not None:
        if not os.path.exists(args.evaluate):
            raise SystemExit(f"error: no policy file {args.evaluate}; see data/policies/ for the shipped ones")
        returns = evaluate(args.env, torch.load(args.evaluate, weights_only=True), args.eval_episodes, args.seed)
        print(describe(args.env, returns, args.evaluate))
        return
    if args.file_stats is not None:
        returns, lengths = file_episodes(args.file_stats)
        if not len(returns):
            raise SystemExit(f"error: {args.file_stats} holds no whole episode")
        print(describe(args.env, returns, args.file_stats) + f"; episode lengths: median {np.median(lengths):.0f}, "
              f"mean {lengths.mean():.1f}, {100 * np.mean(lengths == MAX_EPISODE_STEPS):.1f}% reach "
              f"{MAX_EPISODE_STEPS}")
        return

    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    os.makedirs(args.out, exist_ok=True)
    name = args.env.split("-")[0].lower()
    evaluations, candidates = [], {}

    class Snapshot(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % args.eval_every == 0:
                state = export_actor(self.model)
                returns = evaluate(args.env, state, args.eval_episodes, seed=10_000 + self.num_timesteps)
                score = float(normalized_score(args.env, returns.mean()))
                entry = {"step": self.num_timesteps, "return_mean": float(returns.mean()),
                         "return_std": float(returns.std()), "normalized": score}
                target = MEDIUM_TARGETS[args.env]
                if args.confirm_episodes and abs(score - target) <= args.confirm_within:
                    # A few noisy episodes that happen to land on the target are no proof (the winner's
                    # curse), nor do they show how steady the policy is: every snapshot near the level is
                    # re-measured on more episodes and judged by D4RL's bands on that measurement.
                    confirm = band_check(args.env, evaluate(args.env, state, args.confirm_episodes,
                                                            seed=20_000 + self.num_timesteps))
                    entry.update({f"confirmed_{k}": confirm[k] for k in
                                  ("return_mean", "return_std", "normalized", "cv", "passes")})
                evaluations.append(entry)
                candidates[self.num_timesteps] = state
                confirmed = (f", confirmed {entry['confirmed_normalized']:.1f} CV {entry['confirmed_cv']:.3f} on "
                             f"{args.confirm_episodes} episodes: {'passes' if entry['confirmed_passes'] else 'fails'}"
                             if "confirmed_normalized" in entry else "")
                print(f"{args.env} step {self.num_timesteps}: return {returns.mean():.0f} +- {returns.std():.0f} "
                      f"(normalised {score:.1f}{confirmed}) at {time.time() - start:.0f} s", flush=True)
                save_outputs()
                if args.stop_when_found and entry.get("confirmed_passes"):
                    print(f"stopping: step {self.num_timesteps} passes both bands (--stop_when_found)", flush=True)
                    return False
            return True

    env = gym.make(args.env)
    # SB3's defaults are the SAC paper's (and rlkit's): 2 x 256 ReLU, lr 3e-4, batch 256, tau 5e-3,
    # automatic entropy tuning; learning starts after 10k random steps, as rlkit's SAC does.
    model = SAC("MlpPolicy", env, learning_starts=10_000, seed=args.seed, verbose=0, device="cpu")
    start = time.time()


    def save_outputs() -> None:
        """Keep the current medium/expert choice on disk, so an interrupted run still leaves them."""
        if args.confirm_episodes:
            medium = choose_medium(evaluations, args.env)
        else:  # the old rule: closest on the short evaluation, no bands
            medium = closest_to(evaluations, MEDIUM_TARGETS[args.env])
        kept = {"medium": medium} if medium is not None else {}
        if medium is not None and saved.get("medium") != medium["step"]:
            torch.save(candidates[medium["step"]], os.path.join(args.out, f"{name}-medium.pt"))
            # medium-replay: every transition the agent saw until the medium snapshot, D4RL's format.
            buffer, n = model.replay_buffer, medium["step"]
            timeouts = buffer.timeouts[:n, 0].astype(bool)
            dones = buffer.dones[:n, 0].astype(bool)
            write_d4rl_hdf5(
                os.path.join(args.out, f"{name}-medium-replay.hdf5"),
                observations=buffer.observations[:n, 0], actions=buffer.actions[:n, 0],
                rewards=buffer.rewards[:n, 0], terminals=dones & ~timeouts, timeouts=timeouts,
                next_observations=buffer.next_observations[:n, 0],
                attrs={"env": args.env, "level": "medium-replay", "seed": args.seed,
                       "ref_min_score": REFERENCE_SCORES[args.env][0],
                       "ref_max_score": REFERENCE_SCORES[args.env][1]},
            )
            saved["medium"] = medium["step"]
        best = max(evaluations, key=lambda e: e["normalized"])
        if best["normalized"] >= EXPERT_FRACTION * EXPERT_TARGETS[args.env]:
            if saved.get("expert") != best["step"]:
                torch.save(candidates[best["step"]], os.path.join(args.out, f"{name}-expert.pt"))
                saved["expert"] = best["step"]
            kept["expert"] = best
        with open(os.path.join(args.out, f"{name}-training.json"), "w") as f:
            json.dump({"args": vars(args), "d4rl_medium": {"episodes_mean_std": D4RL_MEDIUM_STATS[args.env],
                                                           "cv": D4RL_MEDIUM_CV[args.env]},
                       "bands": medium_bands(args.env), "kept": kept, "evaluations": evaluations}, f, indent=1)

    saved: dict = {}
    model.learn(total_timesteps=args.total_steps, callback=Snapshot())
    print(f"trained {model.num_timesteps} steps in {time.time() - start:.0f} s", flush=True)
    print(open(os.path.join(args.out, f"{name}-training.json")).read()[:400])


if __name__ == "__main__":
    main()
