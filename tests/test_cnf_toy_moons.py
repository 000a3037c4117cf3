"""algorithms/cnf_toy_moons.py: the unconditional flows' mathematics, the OOD metric, and a reduced run."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import cnf_toy_moons as toy
from conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_toy_flow(latent, n_blocks=3, hidden=16, seed=0):
    """A non-identity unconditional flow in float64: random coupling outputs, ActNorm on box data."""
    torch.manual_seed(seed)
    flow = toy.ToyFlow(2, n_blocks, hidden, latent).double()
    with torch.no_grad():
        for block in flow.blocks:
            block.coupling.conditioner[-1].weight.normal_(0.0, 0.3)
            block.coupling.conditioner[-1].bias.normal_(0.0, 0.3)
            block.coupling.rescale.fill_(0.2)
        flow.encode(torch.rand(256, 2, dtype=torch.float64) * 1.9 - 0.95, initialize=True)
    return flow


@pytest.mark.parametrize("latent", ["normal", "uniform"])
def test_decode_inverts_encode_with_an_empty_condition(latent):
    flow = random_toy_flow(latent)
    points = torch.rand(2048, 2, dtype=torch.float64) * 1.98 - 0.99
    latents, _ = flow.encode(points)
    assert (flow.decode(latents) - points).abs().max() < 1e-9
    if latent == "uniform":
        assert (latents.abs() < 1).all()


@pytest.mark.parametrize("latent", ["normal", "uniform"])
def test_density_integrates_to_one_over_the_box(latent):
    """log_prob is a density on (-1, 1)^2: wrong base densities or a missing log-det would fail."""
    flow = random_toy_flow(latent)
    axis = torch.linspace(-1, 1, 601, dtype=torch.float64)[1:-1]
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = flow.log_prob(grid).exp().reshape(len(axis), len(axis))
    total = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis)
    assert abs(total.item() - 1.0) < 0.02


def test_ood_metric_is_calibrated_on_the_training_distribution():
    rng = np.random.default_rng(0)
    train = rng.uniform(-0.5, 0.5, size=(3000, 2))
    ood = toy.NearestNeighbourOOD(train, quantile=0.99)
    fresh = rng.uniform(-0.5, 0.5, size=(3000, 2))
    assert 0.0 < ood.fraction(fresh) < 0.05  # about 1% by construction
    far = rng.uniform(0.8, 0.95, size=(500, 2))  # a region with no training data
    assert ood.fraction(far) == 1.0


def test_box_edge_latents_lie_on_the_square():
    edge = toy.box_edge_latents(4000, 0.99, torch.Generator().manual_seed(0))
    assert torch.allclose(edge.abs().max(-1).values, torch.full((4000,), 0.99))
    for i in range(2):  # all four sides are used
        assert (edge[:, i] > 0.98).any() and (edge[:, i] < -0.98).any()


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons")
    cmd = [sys.executable, str(ROOT / "algorithms" / "cnf_toy_moons.py"), "--out_dir", str(out), "--steps", "300",
           "--n_train", "1500", "--n_samples", "1500", "--grid", "40", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"results: {out / 'toy_moons.json'}"
    return out, json.loads((out / "toy_moons.json").read_text())


def test_reduced_run_writes_the_promised_fields(reduced_run):
    _, results = reduced_run
    fractions = results["ood_fraction"]
    assert set(fractions["normal"]) == {"1", "1.5", "2", "3", "4"}
    assert set(fractions["uniform"]) == {"box", "edge_0.9", "edge_0.99", "edge_0.999", "edge_1"}
    values = list(fractions["normal"].values()) + list(fractions["uniform"].values())
    assert all(0.0 <= v <= 1.0 for v in values + [fractions["reference_fresh_moons"]])
    assert results["ood_threshold"] > 0
    for name in ("normal", "uniform"):
        assert np.isfinite(results["nll"][name]["train"]) and np.isfinite(results["nll"][name]["valid"])
        # the fitted flow beats the uniform density on the box, log(4) = 1.386 nats
        assert results["nll"][name]["valid"] < np.log(4.0) - 0.3


def test_pushing_the_normal_latent_leaves_the_data(reduced_run):
    _, results = reduced_run
    normal = results["ood_fraction"]["normal"]
    assert normal["4"] > normal["1"] + 0.2
    assert normal["1"] < 0.25 and results["ood_fraction"]["uniform"]["box"] < 0.25


def test_uniform_samples_lie_inside_the_box(reduced_run):
    _, results = reduced_run
    assert results["uniform_samples_inside_box"] is True
    assert results["max_abs_sample"]["uniform"] < 1.0


def test_pngs_are_valid(reduced_run):
    import matplotlib.image

    out, results = reduced_run
    for key in ("fig2", "fig3"):
        path = out / f"{results['figures'][key].rsplit('/', 1)[-1]}"
        assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # something was drawn


@pytest.mark.parametrize("flags, message", [(["--squeeze", "1.0"], "error: --squeeze"),
                                            (["--steps", "0"], "error: --steps")])
def test_bad_flags_are_refused_with_one_line(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        toy.run(toy.parse_config(["--out_dir", str(tmp_path)] + flags))
    assert not (tmp_path / "toy_moons.json").exists()
