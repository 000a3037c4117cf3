"""algorithms/configs/: every YAML loads into its script's TrainConfig, and the per-dataset ones hold the paper's
values."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

CONFIGS = ROOT / "algorithms" / "configs"
sys.path.insert(0, str(CONFIGS))
import make_configs  # noqa: E402

_MODULES = {}


def algorithm_module(name: str):
    """algorithms/<name>.py imported by path under a name of its own (pyrallis needs the dataclass's module
    in sys.modules)."""
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"configs_under_test_{name}", ROOT / "algorithms" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def load(path: Path):
    module = algorithm_module(path.parent.name)
    return module.parse_config(module.TrainConfig, ["--config_path", str(path)])


ALL_YAMLS = sorted(CONFIGS.glob("*/*.yaml"))


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_loads_into_its_scripts_config(path):
    assert (ROOT / "algorithms" / f"{path.parent.name}.py").is_file(), f"no algorithms/{path.parent.name}.py for {path}"
    config = load(path)  # pyrallis refuses a key that is not a TrainConfig field
    assert config.config_path == str(path)


def test_every_algorithm_has_every_table1_dataset():
    missing = [f"{a}/{d}.yaml" for a in make_configs.ALGORITHMS for d in make_configs.DATASETS
               if not (CONFIGS / a / f"{d}.yaml").is_file()]
    assert not missing and len(make_configs.DATASETS) == 12


def test_committed_yamls_are_what_make_configs_writes():
    proc = subprocess.run([sys.executable, str(CONFIGS / "make_configs.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


PER_DATASET = [(a, d) for a in make_configs.ALGORITHMS for d in make_configs.DATASETS]


@pytest.mark.parametrize("algorithm, dataset", PER_DATASET, ids=[f"{a}/{d}" for a, d in PER_DATASET])
def test_per_dataset_values(algorithm, dataset):
    config = load(CONFIGS / algorithm / f"{dataset}.yaml")
    maze = dataset.startswith("maze2d")
    assert config.env == dataset
    # The paper's protocol (Sec. 5) for every algorithm: every 5000 updates, every 100 on HalfCheetah, where
    # the last 10 evaluations then span the last 1000 updates; checkpoints keep a 5000-update schedule.
    if dataset.startswith("halfcheetah"):
        assert (config.eval_every, config.checkpoint_every) == (100, 5000)
    else:
        assert config.eval_every == 5000 and config.checkpoint_every is None
    if algorithm in ("cnf", "cnf_normal_ablation", "cnf_latent_only", "cnf_vae"):  # the paper's Tables 2-3
        assert config.train_steps == (200_000 if dataset.startswith("halfcheetah") else 1_000_000)
        assert config.batch_size == (10240 if maze else 512)
        assert config.awac_lambda == pytest.approx(0.1 if maze else 1 / 3, abs=1e-12)
        assert (config.hidden_dim, config.n_layers, config.tau, config.eval_episodes) == (256, 4, 2e-3, 10)
        assert config.actor_lr == config.critic_lr == 3e-4
    if algorithm in ("cnf", "cnf_normal_ablation", "cnf_latent_only"):
        small = maze or "medium-replay" in dataset
        assert (config.flow_layers, config.flow_hidden) == ((4, 64) if small else (12, 256))
        assert (config.flow_steps, config.flow_valid_fraction, config.flow_grad_clip) == (100_000, 0.1, 0.1)
        assert 1e-5 <= config.flow_lr <= 3e-3 and 0 <= config.flow_weight_decay <= 1e-2
        assert config.flow_batch_size in (512, 1024, 2048)
    if algorithm == "cnf_normal_ablation":
        assert config.latent_clip == 0.0  # Fig. 5; Fig. 6 passes --latent_clip
    if algorithm in ("cnf_vae", "plas"):  # PLAS's official CVAE
        assert (config.vae_hidden, config.vae_steps, config.vae_batch_size, config.vae_lr) == (750, 500_000, 100, 1e-4)
        assert config.z_max == 2.0
    if algorithm == "plas":
        assert (config.train_steps, config.batch_size, config.actor_lr, config.critic_lr) == (500_000, 100, 1e-4, 1e-3)
        assert (config.target_lambda, config.phi, config.normalize_states) == (0.75, 0.0, False)
    if algorithm == "awac":  # CORL
        assert config.awac_lambda == pytest.approx(0.1 if maze else 1 / 3, abs=1e-4)
        assert (config.batch_size, config.train_steps) == (256, 1_000_000)
        assert (config.tau, config.reward_scaling) == (5e-3, "none")
        assert config.eval_episodes == (100 if maze else 10)
    if algorithm == "iql":  # CORL, dataset by dataset
        hopper_m_mr = dataset in ("hopper-medium-v2", "hopper-medium-replay-v2")
        assert config.deterministic_policy == hopper_m_mr
        assert config.tau == (1e-3 if hopper_m_mr else 5e-3)
        assert config.reward_scaling == ("returns" if hopper_m_mr else "none")
        expected = (0.5, 6.0) if dataset == "hopper-medium-expert-v2" else (0.7, 3.0)
        assert (config.expectile, config.beta) == expected
        assert (config.batch_size, config.n_layers, config.eval_episodes) == (256, 3, 100 if maze else 10)


def test_flags_still_override_a_per_dataset_yaml():
    path = CONFIGS / "cnf" / "hopper-medium-replay-v2.yaml"
    module = algorithm_module("cnf")
    config = module.parse_config(module.TrainConfig, ["--config_path", str(path), "--flow_layers", "6", "--seed", "2"])
    assert (config.flow_layers, config.flow_hidden, config.seed) == (6, 64, 2)
