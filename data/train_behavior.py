"""Train the behaviour policies that data/generate.py rolls out, following D4RL's recipe.

D4RL trained SAC (rlkit, tanh-Gaussian actor, 2 x 256 ReLU) and kept snapshots: "medium" is a
policy at about a third of expert return, "medium-replay" is the whole replay buffer up to that
point, "expert" a fully trained policy. This script does the same on Gymnasium MuJoCo with
stable-baselines3's SAC (same actor family: 2 x 256 ReLU, tanh-squashed Gaussian):

    python data/train_behavior.py --env HalfCheetah-v5 --total_steps 300000 --out data/policies

Every `--eval_every` environment steps it evaluates the *stochastic* policy (D4RL's datasets were
collected with stochastic actions) over `--eval_episodes` episodes and keeps the actor as a
candidate. After every evaluation it (re)writes, into `--out`:

- `<env>-medium.pt`: the candidate whose normalised stochastic return is closest to the
  normalised score of D4RL's medium dataset for that environment (MEDIUM_TARGETS below). A
  candidate that would become the closest is first re-measured on `--confirm_episodes` more
  episodes and judged by that score: a 5-episode mean of a policy that sometimes falls is too
  noisy (a Walker2d snapshot measured 61.6 on 5 episodes and 35-47 on 10);
- `<env>-medium-replay.hdf5`: the replay buffer up to that candidate's step, in D4RL's format;
- `<env>-expert.pt`: the best candidate, only if it reaches EXPERT_FRACTION of D4RL's expert
  normalised score;
- `<env>-training.json`: every evaluation (step, mean, std, confirmation), and which candidates were kept.

The shipped policies' returns in data/README.md were measured with the same evaluation, 10 episodes:

    python data/train_behavior.py --env Hopper-v5 --evaluate data/policies/hopper-medium.pt --eval_episodes 10

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
from data.generate import REFERENCE_SCORES, BehaviorPolicy, normalized_score, write_d4rl_hdf5  # noqa: E402

# Normalised scores (x 100) of D4RL's v2 datasets: the average episode of halfcheetah-medium-v2,
# hopper-medium-v2 and walker2d-medium-v2 (the level a "medium" policy is kept at).
MEDIUM_TARGETS = {"HalfCheetah-v5": 40.7, "Hopper-v5": 44.3, "Walker2d-v5": 62.1}
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
    parser.add_argument("--confirm_episodes", type=int, default=20,
                        help="re-measure a snapshot that would become the medium policy on this many more "
                             "episodes and choose by that score (0: choose by the --eval_episodes score alone)")
    parser.add_argument("--evaluate", metavar="POLICY_PT", default=None,
                        help="only evaluate this exported policy: --eval_episodes episodes from --seed, "
                             "stochastic actions (no stable-baselines3 needed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.evaluate is not None:
        if not os.path.exists(args.evaluate):
            raise SystemExit(f"error: no policy file {args.evaluate}; see data/policies/ for the shipped ones")
        returns = evaluate(args.env, torch.load(args.evaluate, weights_only=True), args.eval_episodes, args.seed)
        print(f"{args.evaluate} on {args.env}: return {returns.mean():.1f} +- {returns.std():.1f} over "
              f"{len(returns)} episodes, normalised {normalized_score(args.env, returns.mean()):.1f}")
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
                best_so_far = medium_score(closest_to(evaluations, target)) if evaluations else None
                if args.confirm_episodes and (best_so_far is None or abs(score - target) < abs(best_so_far - target)):
                    # A few noisy episodes that happen to land on the target are no proof (the winner's
                    # curse): a would-be medium snapshot is re-measured on more episodes before it is kept.
                    confirm = evaluate(args.env, state, args.confirm_episodes, seed=20_000 + self.num_timesteps)
                    entry.update(confirmed_return_mean=float(confirm.mean()), confirmed_return_std=float(confirm.std()),
                                 confirmed_normalized=float(normalized_score(args.env, confirm.mean())))
                evaluations.append(entry)
                candidates[self.num_timesteps] = state
                confirmed = (f", confirmed {entry['confirmed_normalized']:.1f} on {args.confirm_episodes} episodes"
                             if "confirmed_normalized" in entry else "")
                print(f"{args.env} step {self.num_timesteps}: return {returns.mean():.0f} +- {returns.std():.0f} "
                      f"(normalised {score:.1f}{confirmed}) at {time.time() - start:.0f} s", flush=True)
                save_outputs()
            return True

    env = gym.make(args.env)
    # SB3's defaults are the SAC paper's (and rlkit's): 2 x 256 ReLU, lr 3e-4, batch 256, tau 5e-3,
    # automatic entropy tuning; learning starts after 10k random steps, as rlkit's SAC does.
    model = SAC("MlpPolicy", env, learning_starts=10_000, seed=args.seed, verbose=0, device="cpu")
    start = time.time()


    def save_outputs() -> None:
        """Keep the current medium/expert choice on disk, so an interrupted run still leaves them."""
        medium = closest_to(evaluations, MEDIUM_TARGETS[args.env])
        kept = {"medium": medium}
        if saved.get("medium") != medium["step"]:
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
            json.dump({"args": vars(args), "kept": kept, "evaluations": evaluations}, f, indent=1)

    saved: dict = {}
    model.learn(total_timesteps=args.total_steps, callback=Snapshot())
    print(f"trained {args.total_steps} steps in {time.time() - start:.0f} s", flush=True)
    print(open(os.path.join(args.out, f"{name}-training.json")).read()[:400])


if __name__ == "__main__":
    main()
