"""CORL's offline AWAC (corl-team/CORL algorithms/offline/awac.py), unmodified and imported at run time, trained on
one of our datasets and evaluated by our vectorised evaluation: the "AWAC against CORL's code" figures in
docs/results.md.

    python tests/benchmarks/corl_awac_run.py CORL/algorithms/offline/awac.py hopper-medium-gymv5 10000 1000 0.3333 0

Arguments: CORL's awac.py, dataset, updates, evaluate every, lambda, seed. Its own networks (4 x 256), Adam 3e-4,
batch 256, tau 5e-3; states normalised by its own compute_mean_std. Nothing of it is copied into this project; its
imports of d4rl, gym and wandb are satisfied by empty stub modules. Prints one JSON line per evaluation.
"""
import importlib.util
import sys
import time
import types
from pathlib import Path

import torch
from official_code import print_evaluation, stub_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "algorithms"))
import awac as ours  # noqa: E402  (our data plumbing and vectorised evaluation only)


def main() -> None:
    path, env = sys.argv[1], sys.argv[2]
    steps, every, lam, seed = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    stub_modules("gym", "d4rl", "wandb")
    sys.modules["gym"].Env, sys.modules["gym"].wrappers = object, types.SimpleNamespace()
    spec = importlib.util.spec_from_file_location("corl_awac", path)
    corl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corl)
    torch.set_num_threads(1)
    data = ours.load_offline_data(ours.TrainConfig(env=env, device="cpu", seed=seed))
    mean, std = corl.compute_mean_std(data.observations, eps=1e-3)
    dataset = {"observations": corl.normalize_states(data.observations, mean, std), "actions": data.actions,
               "rewards": data.rewards, "next_observations": corl.normalize_states(data.next_observations, mean, std),
               "terminals": data.dones}
    corl.set_seed(seed)
    state_dim, action_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    buffer = corl.ReplayBuffer(state_dim, action_dim, len(dataset["rewards"]), "cpu")
    buffer.load_d4rl_dataset(dataset)
    actor = corl.Actor(state_dim, action_dim, 256)
    critic_1, critic_2 = corl.Critic(state_dim, action_dim, 256), corl.Critic(state_dim, action_dim, 256)
    adam = lambda net: torch.optim.Adam(net.parameters(), lr=3e-4)  # noqa: E731
    agent = corl.AdvantageWeightedActorCritic(actor, adam(actor), critic_1, adam(critic_1), critic_2, adam(critic_2),
                                              gamma=0.99, tau=5e-3, awac_lambda=lam)
    start = time.time()
    for step in range(1, steps + 1):
        agent.update(buffer.sample(256))
        if step % every == 0:
            actor.eval()  # CORL's eval_actor: the policy mean
            print_evaluation(ours, data, lambda s: actor._get_policy(s).mean, mean, std, step, seed, start)
            actor.train()


if __name__ == "__main__":
    main()
