"""The official CNF code (tinkoff-ai/cnf), unmodified and imported at run time, trained on one of our datasets and
evaluated by our vectorised evaluation: the "CNF at 50k updates on Hopper, against the official code" figures in
docs/results.md.

    python tests/benchmarks/official_cnf_run.py OFFICIAL_CHECKOUT hopper-medium-gymv5 4 64 8000 50000 2500 0

Arguments: a checkout of github.com/tinkoff-ai/cnf, dataset, flow blocks, flow width, flow steps, RL updates,
evaluate every, seed. Its flow (atanh, blocks, tanh, Uniform latent; Hopper's zero 4th action column) trained by its
`optimize_flow` step (AdamW 5e-4, weight decay 1e-4, batch 1024), then its `AdvantageWeightedActorCritic.update`
(4 x 256, lr 3e-4, tau 2e-3, lambda 1/3, batch 512); acting as its `evaluate` does (actor in train mode: z sampled).
Nothing of it is copied into this project; its imports of gym, d4rl, wandb and sklearn are satisfied by empty stub
modules. Prints one JSON line per flow validation and per evaluation.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from official_code import print_evaluation, stub_modules

ALGORITHMS = Path(__file__).resolve().parents[2] / "algorithms"


def main() -> None:
    official, env = sys.argv[1], sys.argv[2]
    flow_layers, flow_hidden, flow_steps, rl_steps, every, seed = map(int, sys.argv[3:9])
    stub_modules("gym", "d4rl", "wandb", "sklearn", "sklearn.model_selection")
    sys.modules["gym"].Env, sys.modules["sklearn.model_selection"].train_test_split = object, None
    sys.path.insert(0, official)
    from cnf.awac import AdvantageWeightedActorCritic  # the official package
    from cnf.make_flow import make_flow
    from cnf.replay_buffer import ReplayBuffer
    from cnf.train_flow import optimize_flow
    from cnf.train_rl import make_models, make_optimizers

    sys.path.append(str(ALGORITHMS))  # after the official package: our algorithms/cnf.py must not shadow it
    import awac as ours  # our data plumbing and vectorised evaluation only

    torch.set_num_threads(1)
    np.random.seed(seed)
    torch.manual_seed(seed)
    data = ours.load_offline_data(ours.TrainConfig(env=env, device="cpu", seed=seed))
    states, actions = data.observations.astype(np.float32), data.actions.astype(np.float32)
    pad = "hopper" in data.name
    if pad:  # official train_rl / offline_dataset: Hopper's actions get a zero 4th column
        actions = np.concatenate([actions, np.zeros((len(actions), 1), np.float32)], -1)
    state_dim, action_dim = states.shape[1], actions.shape[1]
    mean, std = torch.tensor(states.mean(0)), torch.tensor(states.std(0))
    flow = make_flow(torch.device("cpu"), flow_layers, action_dim, state_dim, flow_hidden, add_atanh=True,
                     uniform_latent=True, state_embedding_mean=mean, state_embedding_std=std)
    optimizer = torch.optim.AdamW(flow.parameters(), lr=5e-4, weight_decay=1e-4)
    flow_actions, flow_states = torch.tensor(actions).clamp(-1 + 2e-5, 1 - 2e-5), torch.tensor(states)
    order = torch.randperm(len(states))
    valid, train = order[: len(order) // 10], order[len(order) // 10:]
    with torch.no_grad():  # official init_flow_act_norm: ActNorm initialised on the first batch
        first = train[torch.randint(0, len(train), (1024,))]
        flow.log_prob(flow_actions[first], flow_states[first])
    start = time.time()
    for step in range(1, flow_steps + 1):
        idx = train[torch.randint(0, len(train), (1024,))]
        optimize_flow(flow, optimizer, [flow_actions[idx], flow_states[idx]])
        if step % 1000 == 0 or step == flow_steps:
            with torch.no_grad():
                nll = -flow.log_prob(flow_actions[valid[:20000]], flow_states[valid[:20000]]).mean().item()
            elapsed = round(time.time() - start)
            print(json.dumps({"flow_step": step, "valid_nll": nll, "elapsed_s": elapsed}), flush=True)
    flow.requires_grad_(False)

    buffer = ReplayBuffer(state_dim, action_dim, max_size=len(states))
    buffer.storage = {key: value.astype(np.float64) for key, value in (
        ("state", states), ("action", actions), ("next_state", data.next_observations),
        ("reward", data.rewards[:, None]), ("done", data.dones[:, None]))}
    buffer.size = len(states)
    actor, critic_1, critic_2 = make_models(256, 4, action_dim, state_dim, mean, std)
    actor_optimizer, critic_1_optimizer, critic_2_optimizer = make_optimizers(actor, critic_1, critic_2, 3e-4, 3e-4)
    agent = AdvantageWeightedActorCritic(actor, actor_optimizer, critic_1, critic_1_optimizer, critic_2,
                                         critic_2_optimizer, 0.99, 2e-3, 1.0 / 3.0, flow=flow)

    def act(raw_states: torch.Tensor) -> torch.Tensor:  # official evaluate: actor.act in train mode, decoded
        latents, _ = actor.act(raw_states)
        decoded, _ = flow.flow_inverse(latents, raw_states)
        return decoded[:, :3] if pad else decoded

    start = time.time()
    for step in range(1, rl_steps + 1):
        agent.update(*buffer.sample(512, "cpu"))
        if step % every == 0:
            print_evaluation(ours, data, act, np.zeros(state_dim), np.ones(state_dim), step, seed, start)


if __name__ == "__main__":
    main()
