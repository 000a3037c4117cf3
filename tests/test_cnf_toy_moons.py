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
    """A reduced run in this process, recording what it computes: every ToyFlow.decode call (the model's latent
    kind, its latents, its points) and the samples, data and OOD metric that go into the figures and the JSON."""
    out = tmp_path_factory.mktemp("moons")
    seen = {"decode": []}
    plot, decode = toy.plot_figures, toy.ToyFlow.decode

    def recording_plot(models, data, samples, ood, config, out_dir):
        seen.update(samples=samples, data=data)
        return plot(models, data, samples, ood, config, out_dir)

    def recording_decode(self, latents):
        points = decode(self, latents)
        seen["decode"].append((self.latent, latents.detach().cpu().numpy().copy(), points.detach().cpu().numpy()))
        return points

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(toy, "plot_figures", recording_plot)
        patch.setattr(toy.ToyFlow, "decode", recording_decode)
        path = toy.run(toy.parse_config(["--out_dir", str(out), "--steps", "300", "--n_train", "1500", "--n_samples",
                                         "1500", "--grid", "40", "--seed", "1"]))
    assert path == out / "toy_moons.json"
    return out, json.loads(path.read_text()), seen


def nearest_distances(points, train, exclude_self=False):
    """Brute-force Euclidean distance from each point to its nearest training point, float64."""
    d = torch.cdist(torch.from_numpy(points).double(), torch.from_numpy(train).double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(1).values.numpy()


@pytest.fixture(scope="module")
def ood_from_the_arrays(reduced_run):
    """The OOD fractions recomputed from the recorded samples (brute force, not the script's KD-tree)."""
    _, results, seen = reduced_run
    train = seen["data"]["train"]
    threshold = float(np.quantile(nearest_distances(train, train, exclude_self=True), 0.99))
    fractions = {name: {key: float((nearest_distances(points, train) > threshold).mean())
                        for key, points in samples.items()} for name, samples in seen["samples"].items()}
    fractions["reference_fresh_moons"] = float((nearest_distances(seen["data"]["reference"], train) > threshold).mean())
    return threshold, fractions


def test_cli_prints_the_results_path(tmp_path):
    cmd = [sys.executable, str(ROOT / "algorithms" / "cnf_toy_moons.py"), "--out_dir", str(tmp_path), "--steps", "2",
           "--n_train", "64", "--n_samples", "64", "--grid", "8", "--n_blocks", "1", "--hidden", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"results: {tmp_path / 'toy_moons.json'}"
    assert json.loads((tmp_path / "toy_moons.json").read_text())["algorithm"] == "cnf_toy_moons"


def test_reduced_run_writes_the_promised_fields(reduced_run, ood_from_the_arrays):
    _, results, _ = reduced_run
    fractions = results["ood_fraction"]
    assert set(fractions["normal"]) == {"1", "1.5", "2", "3", "4"}
    assert set(fractions["uniform"]) == {"box", "edge_0.9", "edge_0.99", "edge_0.999", "edge_1"}
    values = list(fractions["normal"].values()) + list(fractions["uniform"].values())
    assert all(0.0 <= v <= 1.0 for v in values + [fractions["reference_fresh_moons"]])
    # the JSON's OOD numbers are those of the samples themselves (one point of slack per 1500 for ties)
    threshold, recomputed = ood_from_the_arrays
    assert results["ood_threshold"] == pytest.approx(threshold, rel=1e-9)
    for name in ("normal", "uniform"):
        for key, value in recomputed[name].items():
            assert abs(fractions[name][key] - value) <= 1 / 1500, (name, key)
    assert abs(fractions["reference_fresh_moons"] - recomputed["reference_fresh_moons"]) <= 1 / 1500
    assert recomputed["reference_fresh_moons"] < 0.05  # calibrated: fresh data is rarely out of distribution
    for name in ("normal", "uniform"):
        assert np.isfinite(results["nll"][name]["train"]) and np.isfinite(results["nll"][name]["valid"])
        # the fitted flow beats the uniform density on the box, log(4) = 1.386 nats
        assert results["nll"][name]["valid"] < np.log(4.0) - 0.3


def test_pushing_the_normal_latent_leaves_the_data(ood_from_the_arrays):
    _, fractions = ood_from_the_arrays
    normal = fractions["normal"]
    assert normal["4"] > normal["1"] + 0.2
    assert normal["1"] < 0.25 and fractions["uniform"]["box"] < 0.25


def test_uniform_latents_decode_inside_the_box(reduced_run):
    """Every latent the Uniform flow was asked to decode lies in the closed box [-1, 1]^2 (the whole box, then
    the squares max|z_i| = 0.9 ... 1), and every decoded point lies strictly inside the data's box (-1, 1)^2:
    computed from the arrays, and the JSON's verdict and max_abs_sample agree with them."""
    _, results, seen = reduced_run
    calls = [(latents, points) for latent, latents, points in seen["decode"] if latent == "uniform"]
    samples = seen["samples"]["uniform"]
    assert list(samples) == ["box", "edge_0.9", "edge_0.99", "edge_0.999", "edge_1"] and len(calls) == len(samples)
    for (latents, points), (key, sample) in zip(calls, samples.items()):
        assert np.array_equal(points, sample), key  # the recorded decode is the sample the JSON measures
        assert latents.shape == points.shape == (1500, 2)
        assert np.abs(latents).max() <= 1.0
        if key == "box":  # Uniform(-1, 1)^2: it fills the box
            assert latents.min() < -0.99 and latents.max() > 0.99 and abs(latents.mean()) < 0.05
        else:
            np.testing.assert_allclose(np.abs(latents).max(-1), float(key.split("_")[1]), rtol=1e-6)
        assert np.isfinite(points).all() and (np.abs(points) < 1.0).all(), key
    inside = all((np.abs(p) < 1.0).all() for p in samples.values())
    assert results["uniform_samples_inside_box"] is inside is True
    for name, model_samples in seen["samples"].items():
        assert results["max_abs_sample"][name] == pytest.approx(max(np.abs(p).max() for p in model_samples.values()))
    assert results["max_abs_sample"]["uniform"] < 1.0


def test_pngs_are_valid(reduced_run):
    import matplotlib.image

    out, results, _ = reduced_run
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
