"""`--amp` keeps the numbers that matter in float32: bfloat16 only inside hidden layers.

bf16 has an 8-bit mantissa: at Q ~ 400 its grid step is 2, so critics whose output layer ran in bf16 rounded
the advantages Q(s, a) - Q(s, a') that exp(A / lambda) amplifies (27-40% of them came out exactly 0 on the
quick preset). The critics' output layer now runs in float32 on float32 hidden features."""
import numpy as np
import torch

import cnf
from conftest import tiny_flow_config, toy_conditional_data


def critic_with_outputs_in_the_hundreds(amp: bool) -> cnf.TwinCritic:
    torch.manual_seed(0)
    critic = cnf.TwinCritic(17, 6, 256, 4, amp=amp)
    with torch.no_grad():
        critic.net[-1].bias.fill_(400.0)  # Q ~ 400, as on HalfCheetah's returns
        critic.net[-1].weight.mul_(20.0)  # advantages of a few units, the scale lambda = 1/3 divides
    return critic


def test_amp_advantages_match_float32_ones_with_q_in_the_hundreds():
    exact, amp = critic_with_outputs_in_the_hundreds(False), critic_with_outputs_in_the_hundreds(True)
    amp.load_state_dict(exact.state_dict())
    g = torch.Generator().manual_seed(1)
    states, data_actions = torch.randn(4096, 17, generator=g), torch.rand(4096, 6, generator=g) * 2 - 1
    policy_actions = torch.rand(4096, 6, generator=g) * 2 - 1
    with torch.no_grad():
        def advantages(critic):
            both = critic(torch.cat([states, states]), torch.cat([data_actions, policy_actions]))
            q_data, q_policy = both.min(0).values.chunk(2)
            return (q_data - q_policy)[:, 0]
        a_exact, a_amp = advantages(exact), advantages(amp)
    assert exact(states[:4], data_actions[:4]).dtype == amp(states[:4], data_actions[:4]).dtype == torch.float32
    assert 350 < float(exact(states, data_actions).mean()) < 450
    assert np.corrcoef(a_exact.numpy(), a_amp.numpy())[0, 1] >= 0.999
    assert int((a_amp == 0).sum()) <= int((a_exact == 0).sum())


def test_amp_decode_of_a_trained_flow_stays_close_to_float32():
    """The flow's invertible path stays float32; only its conditioners' matmuls are bf16. On a flow trained
    300 steps (a random flow is far smoother than a trained one) decoded actions stay within 0.1 of float32."""
    torch.manual_seed(0)
    config = tiny_flow_config(cnf.TrainConfig, flow_layers=4, flow_hidden=64)
    actions, states = toy_conditional_data(4000)
    flow = cnf.ConditionalFlow(2, 3, config.flow_layers, config.flow_hidden)
    flow.encode(actions[:256], states[:256], initialize=True)
    trainer = cnf.FlowPretrainer(flow, config)
    for _ in range(300):
        idx = torch.randint(0, 3000, (256,))
        trainer.train(actions[idx], states[idx])
    amp_flow = cnf.ConditionalFlow(2, 3, config.flow_layers, config.flow_hidden, amp=True)
    amp_flow.load_state_dict(flow.state_dict())
    flow, amp_flow = cnf.FrozenFlow(flow), cnf.FrozenFlow(amp_flow)
    latents = torch.rand(2000, 2, generator=torch.Generator().manual_seed(2)) * 1.8 - 0.9
    with torch.no_grad():
        exact, approx = flow.decode(latents, states[:2000]), amp_flow.decode(latents, states[:2000])
    error = (exact - approx).abs()
    assert float(error.max()) < 0.1 and float(error.mean()) < 0.01, (float(error.max()), float(error.mean()))
