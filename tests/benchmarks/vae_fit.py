"""How well PLAS's conditional VAE fits a dataset's actions, on held-out rows, as its budget grows.

    python tests/benchmarks/vae_fit.py --env halfcheetah-medium-gymv5 --hidden 256 750 --steps 10000 50000

Trains plas.py's own ConditionalVAE with its own VAEPretrainer (loss, batch 100, Adam 1e-4) on 90% of the
rows and prints, at each budget in --steps, one line per width:
- recon_mse: mean squared error of dec(s, mu(s, a)) against a on the 10% held-out rows (the fit);
- prior_mean_mse: the same for dec(s, 0) (the VAE used as behaviour cloning);
- beyond_zmax: the fraction of held-out rows with some |mu_i(s, a)| > z_max (2): data PLAS's clipped
  latent policy cannot reach;
- steps_per_s on this machine.
States are normalised as cnf.py's (`--raw_states`: official PLAS's raw states). One thread by default.
`--save_dir DIR` writes each width's final VAE as DIR/vae_<hidden>_<steps>.pt in plas.py's vae.pt format, so
`plas.py --vae_checkpoint` can run phase 2 on exactly the VAE measured here.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "algorithms"))
import plas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="halfcheetah-medium-gymv5")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 750])
    parser.add_argument("--steps", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--raw_states", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save_dir", default=None, help="write each width's final VAE here (plas.py vae.pt format)")
    args = parser.parse_args()
    if sorted(args.steps) != args.steps or args.steps[0] <= 0:
        raise SystemExit("error: --steps must be positive and increasing, e.g. --steps 10000 50000")
    torch.set_num_threads(args.threads)

    config = plas.TrainConfig(env=args.env, dataset_path=args.dataset_path, device="cpu", seed=args.seed)
    data = plas.load_offline_data(config)
    buffer = plas.ReplayBuffer(data, "cpu")
    if args.raw_states:
        plas.use_raw_states(buffer, data)
    order = torch.randperm(buffer.size, generator=torch.Generator().manual_seed(args.seed))
    n_valid = buffer.size // 10
    valid, train = order[:n_valid], order[n_valid:]
    valid_states, valid_actions = buffer.states[valid], buffer.actions[valid]

    print(f"# {data.name}: {len(train)} training rows, {n_valid} held out, states "
          f"{'raw' if args.raw_states else 'normalised'}")
    for hidden in args.hidden:
        plas.set_seed(args.seed)
        vae = plas.ConditionalVAE(buffer.actions.shape[1], buffer.states.shape[1], hidden)
        trainer = plas.VAEPretrainer(vae, config)
        done, tick = 0, time.perf_counter()
        for budget in args.steps:
            for _ in range(budget - done):
                idx = train[torch.randint(0, len(train), (config.vae_batch_size,))]
                trainer.train(buffer.actions[idx], buffer.states[idx])
            elapsed, done = time.perf_counter() - tick, budget
            with torch.no_grad():
                mean, _ = vae.encode(valid_actions, valid_states)
                recon = (vae.decode(mean, valid_states) - valid_actions).pow(2).mean()
                prior = (vae.decode(torch.zeros_like(mean), valid_states) - valid_actions).pow(2).mean()
                beyond = (mean.abs() > config.z_max).any(-1).float().mean()
            print(f"vae_fit hidden {hidden} steps {budget} recon_mse {recon:.4f} prior_mean_mse {prior:.4f} "
                  f"beyond_zmax {beyond:.3f} steps_per_s {budget / elapsed:.0f}", flush=True)
        if args.save_dir is not None:
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            plas.save_atomic({"vae": vae.state_dict(), "sizes": vae.describe(), "final_loss": None,
                              "state_mean": torch.from_numpy(buffer.state_mean),
                              "state_std": torch.from_numpy(buffer.state_std)},
                             Path(args.save_dir) / f"vae_{hidden}_{done}.pt")


if __name__ == "__main__":
    main()
