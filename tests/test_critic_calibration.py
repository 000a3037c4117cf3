"""algorithms/critic_calibration.py: a finished run's Q(s, a) beside the data's return-to-go before each fall."""
import json

import h5py
import numpy as np
import pytest

import awac
import critic_calibration
import iql
from conftest import write_tiny_hdf5


def test_returns_to_go_are_exact_and_only_for_episodes_that_fall():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12)
    terminals = np.zeros(12, bool)
    ends = np.zeros(12, bool)
    terminals[3] = ends[3] = True  # episode 0-3 falls
    ends[7] = True  # episode 4-7 hits its time limit: left out
    terminals[11] = ends[11] = True  # episode 8-11 falls
    indices, steps_left, returns = critic_calibration.returns_to_go_before_falls(rewards, terminals, ends, 0.9)
    assert indices.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert steps_left.tolist() == [3, 2, 1, 0, 3, 2, 1, 0]
    for i, start, end in [(0, 0, 3), (4, 8, 11)]:
        for t in range(4):  # G_t = sum_k 0.9^k r_(t+k), summed directly
            want = sum(0.9 ** k * rewards[start + t + k] for k in range(end - start - t + 1))
            assert returns[i + t] == pytest.approx(want, rel=1e-12)
    none = critic_calibration.returns_to_go_before_falls(rewards, np.zeros(12, bool), ends, 0.9)
    assert [len(x) for x in none] == [0, 0, 0]


def tiny_falls_hdf5(path):
    """write_tiny_hdf5's data with a second fall (rows 1200-1249) and positive rewards."""
    write_tiny_hdf5(path)
    with h5py.File(path, "r+") as f:
        terminals, timeouts = f["terminals"][:], f["timeouts"][:]
        terminals[1249], timeouts[1249] = True, False  # a fall 50 steps into the 7th episode
        f["terminals"][...], f["timeouts"][...] = terminals, timeouts
        f["rewards"][...] = np.abs(f["rewards"][:]) + 0.1
    return str(path)


def test_the_tool_scores_awac_and_iql_runs_in_the_rewards_they_trained_on(tmp_path, capsys):
    data = tiny_falls_hdf5(tmp_path / "falls.hdf5")
    shared = dict(device="cpu", dataset_path=data, checkpoints_path=str(tmp_path), wandb_mode="disabled",
                  train_steps=30, eval_every=30, eval_episodes=1, batch_size=32, hidden_dim=32)
    awac.train(awac.TrainConfig(**shared, run_name="awac"))
    iql.train(iql.TrainConfig(**shared, run_name="iql", reward_scaling="returns"))
    out = tmp_path / "calibration.json"
    results = critic_calibration.main([str(tmp_path / "awac"), str(tmp_path / "iql"), "--bins", "0,1,10",
                                       "--out", str(out)])
    with h5py.File(data) as f:
        rewards, terminals = f["rewards"][:].astype(np.float64), f["terminals"][:]
    falls = np.flatnonzero(terminals)  # rows 100 and 1249: episodes 0-100 and 1200-1249
    assert falls.tolist() == [100, 1249]
    by_algorithm = {r["algorithm"]: r for r in results}
    for algorithm, scale in [("awac", 1.0), ("iql", None)]:
        result = by_algorithm[algorithm]
        assert result["falls"] == 2 and result["step"] == 30
        assert [b["steps_left"] for b in result["bins"]] == [[0, 0], [1, 9], [10, None]]
        assert [b["n"] for b in result["bins"]] == [2, 18, 101 + 50 - 20]
        if scale is None:  # iql's CORL reward modification, as iql.py applies it (1000 / (max - min return))
            config = iql.TrainConfig(**shared, reward_scaling="returns")
            scale = iql.scale_rewards(iql.load_offline_data(config), "returns")[1]["reward_scale"]
            assert scale != pytest.approx(1.0, abs=0.1)
        assert result["bins"][0]["return_to_go"] == pytest.approx(scale * rewards[falls].mean(), rel=1e-5)
        first = result["bins"][1]  # 1-9 steps left: the mean of exact discounted sums before each fall
        want = np.mean([sum(0.99 ** k * rewards[end - s + k] for k in range(s + 1)) for end in falls
                        for s in range(1, 10)])
        assert first["return_to_go"] == pytest.approx(scale * want, rel=1e-5)
        assert all(np.isfinite(b["q"]) for b in result["bins"])
    assert json.loads(out.read_text())["runs"] == json.loads(json.dumps(results))
    assert "| awac | falls | 30 | 2 | " in capsys.readouterr().out


def test_the_tool_refuses_bad_input_with_one_error_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit, match="^error: --bins '1,5' must start at 0"):
        critic_calibration.main([str(run), "--bins", "1,5"])
    with pytest.raises(SystemExit, match="^error: --bins 'a' is not"):
        critic_calibration.main([str(run), "--bins", "a"])
    with pytest.raises(SystemExit, match=r"^error: .* \(no config.yaml\)"):
        critic_calibration.main([str(run)])
    with pytest.raises(SystemExit, match="^error: .*missing is not a directory"):
        critic_calibration.main([str(tmp_path / "missing")])
    no_falls = write_tiny_hdf5(tmp_path / "no_falls.hdf5")
    with h5py.File(no_falls, "r+") as f:
        f["terminals"][...] = np.zeros_like(f["terminals"][:])
    awac.train(awac.TrainConfig(device="cpu", dataset_path=no_falls, checkpoints_path=str(tmp_path),
                                wandb_mode="disabled", run_name="awac", train_steps=10, eval_every=10,
                                eval_episodes=1, batch_size=32, hidden_dim=32))
    with pytest.raises(SystemExit, match="^error: .* has no episode that ends in a terminal"):
        critic_calibration.main([str(tmp_path / "awac")])
