"""Shared test helpers: tiny D4RL-format HDF5 files written by the tests themselves."""
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "algorithms"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny models: one thread each is fastest, and it keeps subprocess runs from oversubscribing the cores
# (OpenMP threads spinning against each other slow small workloads down by 10x or more).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


def write_tiny_hdf5(path, n=2000, episode=200, obs_dim=11, act_dim=3, env="Hopper-v5", seed=0, attrs=True):
    """Random D4RL-layout data: episodes of `episode` steps ending in a timeout; one early terminal."""
    rng = np.random.default_rng(seed)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[episode - 1::episode] = True
    terminals = np.zeros(n, dtype=bool)
    terminals[episode // 2] = True  # an episode that ends by termination
    timeouts[episode // 2] = False
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-0.95, 0.95, size=(n, act_dim)).astype(np.float32)
        f["rewards"] = rng.normal(1.0, 0.3, size=n).astype(np.float32)
        f["terminals"] = terminals
        f["timeouts"] = timeouts
        if attrs:
            f.attrs["env"] = env
            f.attrs["ref_min_score"] = -20.272305
            f.attrs["ref_max_score"] = 3234.3
    return str(path)


@pytest.fixture
def tiny_hdf5(tmp_path):
    return write_tiny_hdf5(tmp_path / "tiny.hdf5")
