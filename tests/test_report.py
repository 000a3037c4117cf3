"""algorithms/report.py: Table 1 numbers, in-progress runs, curves and the command line, on fake run directories."""
import json
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
import yaml

import report
from conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASETS = ("hopper-medium-v2", "halfcheetah-medium-gymv5")  # one D4RL dataset (paper row), one bundled
ALGORITHMS = ("cnf", "iql")
SEEDS = (0, 1, 2)


def fake_evaluations(dataset, algorithm, seed, n=15):
    """Distinct, known scores per run: a rising curve plus a per-run offset."""
    offset = 10.0 * DATASETS.index(dataset) + 3.0 * ALGORITHMS.index(algorithm) + 1.7 * seed ** 2
    return [(1000 * (i + 1), 20.0 + 2.0 * i + offset + 0.1 * (i % 3)) for i in range(n)]


def write_run(root, algorithm, dataset, seed, evaluations, finished=True, flow_nll=None, name=None, extra_config=None):
    run = root / (name or f"{algorithm}-{dataset}-seed{seed}-20250101-000000")
    run.mkdir(parents=True)
    config = {"env": dataset, "dataset_path": None, "seed": seed, "train_steps": 15000, **(extra_config or {})}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step, nll in (flow_nll or []):
        lines.append({"step": step, "flow/train_nll": nll + 0.1, "flow/valid_nll": nll})
    for step, score in evaluations:
        lines.append({"step": step, "eval/normalized_score": score, "eval/return": 123.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if finished:
        scores = [s for _, s in evaluations]
        (run / "results.json").write_text(json.dumps({
            "algorithm": algorithm, "dataset": dataset, "final_normalized_score": scores[-1],
            "last10_mean_normalized_score": float(np.mean(scores[-10:])),
            "evaluations": [{"step": st, "normalized_score": sc} for st, sc in evaluations]}))
    return run


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    for dataset in DATASETS:
        for algorithm in ALGORITHMS:
            for seed in SEEDS:
                flow = [(500 * k, -1.0 - 0.5 * k - 0.1 * seed) for k in range(1, 5)] if algorithm == "cnf" else None
                write_run(root / algorithm, algorithm, dataset, seed, fake_evaluations(dataset, algorithm, seed),
                          flow_nll=flow)
    return root


def expected_cell(dataset, algorithm, seeds=SEEDS):
    per_run = [statistics.mean(s for _, s in fake_evaluations(dataset, algorithm, seed)[-10:]) for seed in seeds]
    return statistics.mean(per_run), statistics.pstdev(per_run)


def table_rows(markdown):
    """The first table of report.md: dataset -> {algorithm: cell}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| dataset |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def parse_cell(cell):
    match = re.fullmatch(r"(-?[\d.]+) ± ([\d.]+) \((\d+)\)(\*?)", cell)
    assert match, cell
    return float(match[1]), float(match[2]), int(match[3]), match[4] == "*"


def test_table_numbers_are_the_mean_and_std_over_seeds(runs_root, tmp_path):
    path = report.main([str(runs_root), "--out", str(tmp_path / "report")])
    rows = table_rows(path.read_text())
    assert set(rows) == set(DATASETS)
    for dataset in DATASETS:
        assert set(rows[dataset]) == set(ALGORITHMS)
        for algorithm in ALGORITHMS:
            mean, std, n, running = parse_cell(rows[dataset][algorithm])
            want_mean, want_std = expected_cell(dataset, algorithm)
            assert want_std > 0.5  # the seeds really differ, so a wrong std would show
            assert (n, running) == (3, False)
            assert abs(mean - want_mean) < 0.006 and abs(std - want_std) < 0.006
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["groups"]
    group = summary["hopper-medium-v2|iql"]
    want_mean, want_std = expected_cell("hopper-medium-v2", "iql")
    assert group["mean"] == pytest.approx(want_mean) and group["std"] == pytest.approx(want_std)


def test_paper_table_lists_only_the_d4rl_datasets(runs_root, tmp_path):
    text = report.main([str(runs_root), "--out", str(tmp_path / "report")]).read_text()
    paper = text.split("## Paper, Table 1")[1].split("##")[0]
    assert "| hopper-medium-v2 | 62.59 | 63.7 | 52.93 | 51.63 | 69.32 ± 1.04 |" in paper
    assert "gymv5" not in paper


def test_pngs_exist_and_are_valid(runs_root, tmp_path):
    import matplotlib.image

    out = tmp_path / "report"
    report.main([str(runs_root), "--out", str(out)])
    for dataset in DATASETS:
        for kind in ("learning_curves", "flow_nll"):  # cnf runs log flow NLLs
            path = out / f"{kind}_{dataset}.png"
            assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
            assert matplotlib.image.imread(path).ndim == 3
    text = (out / "report.md").read_text()
    assert "](learning_curves_hopper-medium-v2.png)" in text and "](flow_nll_hopper-medium-v2.png)" in text


def test_in_progress_run_counts_from_metrics_and_is_marked(runs_root, tmp_path):
    evaluations = fake_evaluations("hopper-medium-v2", "cnf", 3, n=7)
    run = write_run(runs_root / "cnf", "cnf", "hopper-medium-v2", 3, evaluations, finished=False)
    # a resumed run re-logs a step: the later line wins
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": evaluations[-1][0], "eval/normalized_score": 99.0}) + "\n")
        f.write('{"step": 80')  # a line cut by a crash
    evaluations[-1] = (evaluations[-1][0], 99.0)
    rows = table_rows(report.main([str(runs_root), "--out", str(tmp_path / "r")]).read_text())
    mean, std, n, running = parse_cell(rows["hopper-medium-v2"]["cnf"])
    per_run = [statistics.mean(s for _, s in fake_evaluations("hopper-medium-v2", "cnf", seed)[-10:]) for seed in SEEDS]
    per_run.append(statistics.mean(s for _, s in evaluations))  # 7 evaluations so far: all of them
    assert (n, running) == (4, True)
    assert abs(mean - statistics.mean(per_run)) < 0.006 and abs(std - statistics.pstdev(per_run)) < 0.006
    assert parse_cell(rows["hopper-medium-v2"]["iql"])[3] is False
    rows = table_rows(report.main([str(runs_root), "--out", str(tmp_path / "f"), "--finished_only"]).read_text())
    assert parse_cell(rows["hopper-medium-v2"]["cnf"])[2:] == (3, False)


def test_in_progress_algorithm_from_config_fields_and_unknown_runs_skipped(tmp_path):
    fields = report.known_algorithms()["iql"]
    assert fields is not None and {"expectile", "beta"} <= fields
    evaluations = fake_evaluations("hopper-medium-v2", "iql", 0, n=3)
    run = write_run(tmp_path / "runs", "iql", "hopper-medium-v2", 0, evaluations, finished=False, name="custom")
    (run / "config.yaml").write_text(yaml.safe_dump({name: None for name in fields} | {"env": "hopper-medium-v2",
                                                                                        "seed": 0}))
    write_run(tmp_path / "runs", "x", "hopper-medium-v2", 1, evaluations, finished=False, name="mystery")
    with pytest.warns(UserWarning, match="mystery"):
        runs = report.find_runs([str(tmp_path / "runs")])
    assert [(r.algorithm, r.dataset, r.finished) for r in runs] == [("iql", "hopper-medium-v2", False)]


def test_split_by_gives_one_column_per_value(tmp_path):
    for seed, clip in ((0, 1.0), (1, 1.0), (0, 2.0)):
        write_run(tmp_path / "runs" / f"a{clip}", "cnf_normal_ablation", "walker2d-medium-v2", seed,
                  fake_evaluations("hopper-medium-v2", "cnf", seed), extra_config={"latent_clip": clip})
    rows = table_rows(report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "r"),
                                   "--split_by", "latent_clip"]).read_text())
    cells = rows["walker2d-medium-v2"]
    assert parse_cell(cells["cnf_normal_ablation[latent_clip=1.0]"])[2] == 2
    assert parse_cell(cells["cnf_normal_ablation[latent_clip=2.0]"])[2] == 1


def test_aligned_curve_uses_the_seeds_that_reached_each_step():
    steps, mean, std, count = report.aligned_curve([[(1, 1.0), (2, 3.0)], [(1, 3.0)]])
    assert steps.tolist() == [1, 2] and mean.tolist() == [2.0, 3.0] and std.tolist() == [1.0, 0.0]
    assert count.tolist() == [2, 1]


@pytest.mark.parametrize("name, paper", [("hopper_medium_replay-v2", "hopper-medium-replay-v2"),
                                         ("maze2d-umaze-sparse-v1", "maze2d-umaze-v1"),
                                         ("walker2d-medium-expert-v2", "walker2d-medium-expert-v2"),
                                         ("halfcheetah-medium-gymv5", None), ("hopper_random-v2", None)])
def test_paper_dataset_names(name, paper):
    assert report.paper_dataset_name(name) == paper


def test_command_line(runs_root, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(ROOT / "algorithms" / "report.py"), str(runs_root / "cnf"),
                           str(runs_root / "iql"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "algorithms" / "report.py"), str(empty)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "error: no run directories" in proc.stderr and "Traceback" not in proc.stderr
