"""Writes the per-dataset configs `algorithms/configs/<algo>/<dataset>.yaml` of Table 1 and the figures.

    python algorithms/configs/make_configs.py           # (re)write every per-dataset YAML
    python algorithms/configs/make_configs.py --check   # exit 1 and name the files that differ from it

The YAMLs are committed and are what you run (`--config_path algorithms/configs/cnf/hopper-medium-v2.yaml`);
this script is the one place where their rules live, so that a changed value or a renamed config field
is one edit here instead of 84 by hand. tests/test_configs.py checks that the committed files are
exactly what it writes and that every one loads into its script's TrainConfig.

Datasets: the 12 of Table 1: halfcheetah | hopper | walker2d x medium | medium-replay | medium-expert
(-v2) and maze2d-umaze | maze2d-medium | maze2d-large (-v1; these need d4rl, i.e. the Docker image).

Values (sources: the CNF paper, arXiv 2211.11096, its official code, and each algorithm file's docstring):
- cnf, cnf_normal_ablation, cnf_latent_only (the ablations use CNF's values, so that a figure compares
  one change): flow 12 x 256 on medium and medium-expert, 4 x 64 on medium-replay and maze2d (Table 3),
  100k pre-training steps at the official run config (AdamW lr 5e-4, wd 1e-4, batch 1024, clip 0.1; the
  paper picks lr, wd and batch by random search: algorithms/cnf_flow_search.py); RL (Table 2) 1M
  updates (HalfCheetah 200k), actor/critics 4 x 256, lr 3e-4, batch 512 (maze2d 10240), tau 2e-3,
  lambda 1/3 (maze2d 1/10); 10 evaluation episodes every 5000 updates. cnf_normal_ablation: latent_clip
  0 (Fig. 5; Fig. 6 adds --latent_clip A).
- cnf_vae (Fig. 7): CNF's RL values with PLAS's official CVAE (2 x 750, 500k steps, batch 100, lr 1e-4,
  KL weight 0.5) as the decoder, z_max 2 (PLAS's max_latent_action).
- awac: CORL's configs/offline/awac/<env>/<dataset>.yaml (identical for every locomotion set: lambda
  1/3 written 0.3333; maze2d: lambda 0.1, 100 evaluation episodes), evaluation every 5000 updates.
- iql: CORL's configs/offline/iql/<env>/<dataset>.yaml, dataset by dataset (hopper-medium and
  hopper-medium-replay: deterministic policy, tau 1e-3, rewards scaled by 1000 / return range;
  hopper-medium-expert: beta 6, expectile 0.5; maze2d: 100 evaluation episodes; the rest expectile 0.7,
  beta 3, rewards unscaled).
- plas: the official main.py defaults, which are the same for every task (maze2d included; the code
  has no per-task settings): VAE 2 x 750 for 500k steps, then 500k RL updates at batch 100.
- lapo: the official main_d4rl.py defaults (every network 3 x 256, batch 512, lr 2e-4, expectile 0.9,
  z_max 2, doubleq_min 1, rewards / max reward, 1M updates, evaluation every 5000), kl_beta 0.3 for
  maze2d (the official README's maze2d command).
- sfbc: the official defaults (ChenDRAG/SfBC utils.py, train_behavior.py, train_critic.py), the same for
  every dataset: score network 512-256-128 ("large"), 586k behaviour steps (600 epochs of 4M samples at
  batch 4096), DPM-Solver order 3 with 15 steps, K = 2 critic fits of 24.5k updates (100 epochs of 1M
  samples), 16 planning candidates, alpha 20; acting 32 candidates, alpha 100, 4 averaged on locomotion,
  1 on maze2d. The SfBC paper reports no maze2d numbers (its code loads maze2d data).
"""
import argparse
import sys
import textwrap
from pathlib import Path
from typing import List, Tuple

CONFIGS = Path(__file__).resolve().parent
LOCOMOTION = [f"{env}-{level}-v2" for env in ("halfcheetah", "hopper", "walker2d")
              for level in ("medium", "medium-replay", "medium-expert")]
MAZE2D = [f"maze2d-{size}-v1" for size in ("umaze", "medium", "large")]
DATASETS = LOCOMOTION + MAZE2D
ALGORITHMS = ("cnf", "cnf_normal_ablation", "cnf_latent_only", "cnf_vae", "awac", "iql", "plas", "lapo", "sfbc")
Field = Tuple[str, object, str]  # (name, value, comment or "")


def kind(dataset: str) -> str:
    """medium | medium-replay | medium-expert | maze2d: the dataset types that the paper's values depend on."""
    if dataset.startswith("maze2d"):
        return "maze2d"
    return dataset.split("-", 1)[1][: -len("-v2")]


def evaluation_schedule(dataset: str) -> List[Field]:
    """The CNF paper's protocol for every algorithm we run (Sec. 5): evaluate every 5000 updates, but every
    100 on HalfCheetah, where Table 1's mean of the last 10 evaluations then spans the last 1000 updates;
    checkpoints keep their own 5000-update schedule there (a checkpoint costs more than an evaluation)."""
    if dataset.startswith("halfcheetah"):
        return [("eval_every", 100, "paper Sec. 5: every 100 updates on HalfCheetah"), ("checkpoint_every", 5000, "")]
    return [("eval_every", 5000, "paper Sec. 5")]


def cnf_rl(dataset: str) -> List[Field]:
    """Phase 2 of CNF (Table 2; official run config), shared by every CNF variant."""
    maze = kind(dataset) == "maze2d"
    cheetah = dataset.startswith("halfcheetah")
    return [
        ("train_steps", 200_000 if cheetah else 1_000_000,  # the text's 1M; its Table 2 prints 100k
         "paper text: HalfCheetah 200k" if cheetah else "paper text: 1M (Table 2 prints 100k)"),
        ("batch_size", 10240 if maze else 512,
         "paper: maze2d 10240" if maze else "official run config (grid {256, 512, 1024})"),
        ("hidden_dim", 256, ""),
        ("n_layers", 4, "official run config (grid {3, 4})"),
        ("actor_lr", 3e-4, ""),
        ("critic_lr", 3e-4, ""),
        ("gamma", 0.99, ""),
        ("tau", 2e-3, ""),
        ("awac_lambda", 0.1 if maze else 1.0 / 3.0, "paper: 1/10 maze2d" if maze else "paper: 1/3 locomotion"),
        ("exp_adv_max", 100.0, ""),
        *evaluation_schedule(dataset),
        ("eval_episodes", 10, ""),
    ]


def cnf_flow(dataset: str) -> List[Field]:
    """Phase 1 (Table 3; official run config for the values the paper picks by random search)."""
    small = kind(dataset) in ("medium-replay", "maze2d")
    why = "paper: medium-replay and maze2d" if small else "paper: medium and medium-expert"
    return [
        ("flow_layers", 4 if small else 12, why),
        ("flow_hidden", 64 if small else 256, why),
        ("flow_steps", 100_000, ""),
        ("flow_batch_size", 1024, "official run config; searched in {512, 1024, 2048}"),
        ("flow_lr", 5e-4, "official run config; searched in [1e-5, 3e-3]"),
        ("flow_weight_decay", 1e-4, "official run config; searched in [0, 1e-2]"),
        ("flow_grad_clip", 0.1, ""),
        ("flow_valid_fraction", 0.1, ""),
        ("flow_eval_every", 1000, ""),
    ]


def cnf(dataset: str) -> List[Field]:
    return cnf_flow(dataset) + cnf_rl(dataset)


def cnf_normal_ablation(dataset: str) -> List[Field]:
    return cnf(dataset) + [("latent_clip", 0.0, "Fig. 5: unbounded N(mu, sigma); Fig. 6: --latent_clip A")]


def cnf_latent_only(dataset: str) -> List[Field]:
    return cnf(dataset)


PLAS_VAE: List[Field] = [
    ("vae_hidden", 750, "official (d3rlpy's reproduction: 128 on medium-replay)"),
    ("vae_steps", 500_000, ""),
    ("vae_batch_size", 100, ""),
    ("vae_lr", 1e-4, ""),
    ("vae_kl_weight", 0.5, ""),
    ("vae_save_every", 50_000, ""),
]


def cnf_vae(dataset: str) -> List[Field]:
    return PLAS_VAE + cnf_rl(dataset) + [("z_max", 2.0, "PLAS's max_latent_action")]


def awac(dataset: str) -> List[Field]:
    maze = kind(dataset) == "maze2d"
    return [
        ("train_steps", 1_000_000, ""),
        ("batch_size", 256, ""),
        ("hidden_dim", 256, ""),
        ("n_layers", 4, ""),
        ("actor_lr", 3e-4, ""),
        ("critic_lr", 3e-4, ""),
        ("gamma", 0.99, ""),
        ("tau", 5e-3, ""),
        ("awac_lambda", 0.1 if maze else 0.3333, "CORL: maze2d 0.1" if maze else "CORL: 0.3333 (1/3)"),
        ("exp_adv_max", 100.0, ""),
        ("reward_scaling", "none", ""),
        *evaluation_schedule(dataset),  # the CNF paper's protocol (CORL: every 1000)
        ("eval_episodes", 100 if maze else 10, "CORL: maze2d 100" if maze else ""),
    ]


def iql(dataset: str) -> List[Field]:
    maze = kind(dataset) == "maze2d"
    hopper_mr = dataset in ("hopper-medium-v2", "hopper-medium-replay-v2")
    hopper_me = dataset == "hopper-medium-expert-v2"
    return [
        ("train_steps", 1_000_000, ""),
        ("batch_size", 256, ""),
        ("hidden_dim", 256, ""),
        ("n_layers", 3, ""),
        ("actor_lr", 3e-4, ""),
        ("critic_lr", 3e-4, ""),
        ("value_lr", 3e-4, ""),
        ("gamma", 0.99, ""),
        ("tau", 1e-3 if hopper_mr else 5e-3, "CORL: hopper-medium(-replay) 1e-3" if hopper_mr else ""),
        ("expectile", 0.5 if hopper_me else 0.7, "CORL: hopper-medium-expert 0.5" if hopper_me else ""),
        ("beta", 6.0 if hopper_me else 3.0, "CORL: hopper-medium-expert 6" if hopper_me else ""),
        ("exp_adv_max", 100.0, ""),
        ("deterministic_policy", hopper_mr, "CORL: hopper-medium(-replay) deterministic" if hopper_mr else ""),
        ("reward_scaling", "returns" if hopper_mr else "none",
         "CORL: normalize_reward true" if hopper_mr else "CORL: normalize_reward false (the IQL paper: returns)"),
        *evaluation_schedule(dataset),
        ("eval_episodes", 100 if maze else 10, "CORL: maze2d 100" if maze else ""),
    ]


def plas(dataset: str) -> List[Field]:
    return [("normalize_states", False, "official: raw states")] + PLAS_VAE + [
        ("train_steps", 500_000, "official: 500k"),
        ("batch_size", 100, ""),
        ("actor_lr", 1e-4, ""),
        ("critic_lr", 1e-3, ""),
        ("gamma", 0.99, ""),
        ("tau", 5e-3, ""),
        ("target_lambda", 0.75, ""),
        ("z_max", 2.0, "official --max_latent_action 2"),
        ("phi", 0.0, "PLAS; PLAS+P: --phi 0.05"),
        *evaluation_schedule(dataset),  # the CNF paper's protocol (official: every 1000)
        ("eval_episodes", 10, ""),
    ]


def lapo(dataset: str) -> List[Field]:
    maze = kind(dataset) == "maze2d"
    return [
        ("train_steps", 1_000_000, "official: 1M"),
        ("batch_size", 512, ""),
        ("hidden_dim", 256, ""),
        ("n_layers", 4, "official: 3 hidden layers of 256"),
        ("vae_lr", 2e-4, ""),
        ("actor_lr", 2e-4, ""),
        ("critic_lr", 2e-4, ""),
        ("gamma", 0.99, ""),
        ("tau", 5e-3, ""),
        ("expectile", 0.9, ""),
        ("kl_beta", 0.3 if maze else 1.0, "official README: maze2d --kl_beta 0.3" if maze else ""),
        ("z_max", 2.0, "official --max_latent_action 2"),
        ("target_lambda", 1.0, "official --doubleq_min 1 (antmaze 0.7)"),
        ("reward_scaling", "max", "official: r / max r; V clamped to [min r, max r] / (1 - gamma)"),
        *evaluation_schedule(dataset),  # the CNF paper's protocol (official: every 5000)
        ("eval_episodes", 10, ""),
    ]


def sfbc(dataset: str) -> List[Field]:
    maze = kind(dataset) == "maze2d"
    return [
        ("score_widths", [512, 256, 128], 'official "large" ScoreNet'),
        ("train_steps", 586_000, "official: 600 epochs of 4M samples at batch 4096"),
        ("batch_size", 4096, ""),
        ("behavior_lr", 1e-4, ""),
        ("solver_steps", 15, ""),
        ("solver_order", 3, ""),
        ("planning_candidates", 16, ""),
        ("planning_rounds", 2, "official K = 2"),
        ("critic_steps", 24_500, "official: 100 epochs of 1M samples at batch 4096"),
        ("critic_lr", 1e-3, ""),
        ("gamma", 0.99, ""),
        ("value_alpha", 20.0, ""),
        ("eval_candidates", 32, ""),
        ("select_alpha", 100.0, ""),
        ("select_count", 1 if maze else 4, "official: 1 outside locomotion" if maze else "official: 4 on locomotion"),
        *evaluation_schedule(dataset),  # the CNF paper's protocol (official: every 5 critic epochs, ~1225 updates)
        ("eval_episodes", 10, ""),
    ]


HEADERS = {
    "cnf": "CNF (algorithms/cnf.py) for Table 1 and Fig. 4: the paper's Tables 2-3 and the official run config\n"
           "(tinkoff-ai/cnf configs/run_rl.py, run_flow.py). As the paper, with the flow picked by Table 3's\n"
           "random search (one flow per dataset, shared by the seeds):\n"
           "  python algorithms/cnf_flow_search.py --config_path {path} --trials {trials} --out flows/{dataset}.pt\n"
           "  python algorithms/cnf.py --config_path {path} --flow_checkpoint flows/{dataset}.pt --seed 0",
    "cnf_normal_ablation": "Normal-latent ablation (algorithms/cnf_normal_ablation.py), Figs. 5, 6, 8: CNF's values "
                           "for this\n"
                           "dataset (configs/cnf/{dataset}.yaml) with a Normal latent; Fig. 6 adds --latent_clip A.",
    "cnf_latent_only": "Latent-only ablation (algorithms/cnf_latent_only.py), Fig. 9 (A.4): CNF's values for this "
                       "dataset\n"
                       "(configs/cnf/{dataset}.yaml); only where the gradient flows differs.",
    "cnf_vae": "CNF-VAE (algorithms/cnf_vae.py), Fig. 7: CNF's RL values for this dataset "
               "(configs/cnf/{dataset}.yaml)\n"
               "with PLAS's official CVAE (Wenxuan-Zhou/PLAS main.py defaults) as the decoder.",
    "awac": "AWAC (algorithms/awac.py) for Table 1: CORL's configs/offline/awac/ values for this dataset.",
    "iql": "IQL (algorithms/iql.py) for Table 1: CORL's configs/offline/iql/ values for this dataset.",
    "plas": "PLAS (algorithms/plas.py) for Table 1: the official defaults (Wenxuan-Zhou/PLAS main.py), one set\n"
            "for every task. medium-replay: d3rlpy's reproduction uses --vae_hidden 128; PLAS+P: --phi 0.05.",
    "lapo": "LAPO (algorithms/lapo.py) for Table 1: the official defaults (pcchenxi/LAPO-offlienRL main_d4rl.py),\n"
            "one set for locomotion; maze2d adds the README's --kl_beta 0.3.",
    "sfbc": "SfBC (algorithms/sfbc.py), beside Table 1 (not in the CNF paper): the official defaults (ChenDRAG/SfBC\n"
            "utils.py, train_behavior.py, train_critic.py), one set for every dataset. final_normalized_score is the\n"
            "final policy (after the last planning round); the last-10 mean may include the first round's.",
}
MAZE2D_NOTES = {
    "awac": "maze2d: CORL's configs/offline/awac/maze2d/*_v1.yaml (lambda 0.1, rewards unscaled, 100 evaluation\n"
            "episodes; every 5000 updates here, the CNF paper's protocol, instead of CORL's 1000).",
    "iql": "maze2d: CORL's configs/offline/iql/maze2d/*_v1.yaml (expectile 0.7, beta 3, rewards unscaled, 100\n"
           "evaluation episodes every 5000 updates). The IQL paper has no maze2d values.",
    "plas": "maze2d: the official code has no per-task settings, so its defaults (tuned on locomotion) apply;\n"
            "states unnormalised as in the official code.",
    "lapo": "maze2d: the official README's command, main_d4rl.py --kl_beta 0.3 (rewards r / max r, as every\n"
            "non-antmaze dataset).",
    "sfbc": "maze2d: the SfBC paper reports no maze2d numbers; its code loads maze2d data (as one episode: here\n"
            "timeouts end episodes) and averages 1 selected candidate outside locomotion.",
}


def wrap_comment(lines: List[str], width: int = 116) -> List[str]:
    """Comment lines of at most `width` columns; a long command is continued with a backslash."""
    out = []
    for line in lines:
        command = line.lstrip().startswith("python")
        pieces = textwrap.wrap(line, width - 2 if command else width, subsequent_indent="      " if command else "",
                               break_long_words=False, break_on_hyphens=False) or [""]
        out += [piece + " \\" for piece in pieces[:-1]] + pieces[-1:] if command else pieces
    return out


def render(algorithm: str, dataset: str) -> str:
    path = f"algorithms/configs/{algorithm}/{dataset}.yaml"
    trials = 20 if kind(dataset) == "maze2d" else 50
    lines = [f"{dataset}. " + HEADERS[algorithm].format(path=path, dataset=dataset, trials=trials),
             "Run (the paper: seeds 0, 1 and 2):", f"  python algorithms/{algorithm}.py --config_path {path} --seed 0"]
    if kind(dataset) == "maze2d":
        lines.append("maze2d needs d4rl: run it in the Docker image.")
        if algorithm in MAZE2D_NOTES:
            lines.append(MAZE2D_NOTES[algorithm])
    lines.append("Generated by algorithms/configs/make_configs.py: edit that script, not this file.")
    text = "".join(f"# {line}\n" for line in wrap_comment("\n".join(lines).split("\n")))
    text += f"env: {dataset}\n"
    for name, value, comment in globals()[algorithm](dataset):
        text += f"{name}: {format_value(value)}" + (f"  # {comment}" if comment else "") + "\n"
    return text


def format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        # PyYAML reads 1e-05 (no dot) as a string: spell such floats out.
        return text if "." in text else f"{value:.10f}".rstrip("0")
    return str(value)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    args = parser.parse_args(argv)
    stale = []
    for algorithm in ALGORITHMS:
        for dataset in DATASETS:
            path = CONFIGS / algorithm / f"{dataset}.yaml"
            text = render(algorithm, dataset)
            if path.exists() and path.read_text() == text:
                continue
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for path in stale:
        print(f"{'differs' if args.check else 'wrote'}: {path.relative_to(CONFIGS.parents[1])}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
