"""algorithms/report.py on fake run directories: Table 1 numbers beside the paper's, in-progress, dead, duplicate
and unreadable runs, curves and the command line."""
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

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


def write_run(root, algorithm, dataset, seed, evaluations, finished=True, flow_nll=None, name=None, extra_config=None,
              dataset_score=None, status=None, age_s=0.0):
    """A run directory as the algorithm files leave it; `status`: status.json's content; `age_s`: how long ago
    its files were last written."""
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
            "evaluations": [{"step": st, "normalized_score": sc} for st, sc in evaluations],
            "dataset_normalized_score": dataset_score}))
    if status is not None:
        (run / "status.json").write_text(json.dumps(status))
    backdate(run, age_s)
    return run


def backdate(run, age_s):
    """Set the modification time of the run directory and its files to `age_s` seconds ago."""
    when = time.time() - age_s
    for path in [*run.iterdir(), run]:
        os.utime(path, (when, when))


def dead_pid():
    """The pid of a process that has exited (and been reaped): not alive on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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
        assert set(rows[dataset]) == set(ALGORITHMS) | {f"{a} (paper)" for a in ALGORITHMS}  # no dataset average
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


def test_paper_numbers_beside_ours_for_d4rl_names_only(runs_root, tmp_path):
    text = report.main([str(runs_root), "--out", str(tmp_path / "report")]).read_text()
    rows = table_rows(text)
    hopper = rows["hopper-medium-v2"]
    assert (hopper["cnf (paper)"], hopper["iql (paper)"]) == ("69.32 ± 1.04", "63.7")
    assert rows["halfcheetah-medium-gymv5"]["cnf (paper)"] == "-"
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


def test_in_progress_algorithm_from_config_fields_and_unknown_runs_skipped(tmp_path, capsys):
    fields = report.known_algorithms()["iql"]
    assert fields is not None and {"expectile", "beta"} <= fields
    evaluations = fake_evaluations("hopper-medium-v2", "iql", 0, n=3)
    run = write_run(tmp_path / "runs", "iql", "hopper-medium-v2", 0, evaluations, finished=False, name="custom")
    (run / "config.yaml").write_text(yaml.safe_dump({name: None for name in fields} | {"env": "hopper-medium-v2",
                                                                                        "seed": 0}))
    write_run(tmp_path / "runs", "x", "hopper-medium-v2", 1, evaluations, finished=False, name="mystery")
    runs, skipped = report.find_runs([str(tmp_path / "runs")])
    assert [(r.algorithm, r.dataset, r.finished) for r in runs] == [("iql", "hopper-medium-v2", False)]
    assert [(path.name, "cannot be inferred" in reason) for path, reason in skipped] == [("mystery", True)]
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: skipped run directory") and "mystery" in warning and "\n" not in warning


def test_duplicate_seeds_dead_and_unreadable_runs(runs_root, tmp_path, capsys):
    """Two more runs of iql seed 0 count once (the newest finished one); a run whose status.json says running
    with a pid that is not alive on this host died; unreadable directories are skipped with one warning each."""
    root = runs_root / "iql"
    older = fake_evaluations("hopper-medium-v2", "iql", 0)
    newest = [(step, score + 30.0) for step, score in older]
    write_run(root, "iql", "hopper-medium-v2", 0, older, name="iql-hopper-medium-v2-seed0-older", age_s=7200)
    write_run(root, "iql", "hopper-medium-v2", 0, newest, name="iql-hopper-medium-v2-seed0-newest")
    dead = write_run(runs_root / "cnf", "cnf", "hopper-medium-v2", 3, fake_evaluations("hopper-medium-v2", "cnf", 3, 4),
                     finished=False, status={"state": "running", "pid": dead_pid(), "host": socket.gethostname(),
                                             "step": 4000})
    broken = {"empty-results": ("results.json", ""), "corrupt-results": ("results.json", '{"algorithm": "iq'),
              "no-keys": ("results.json", "{}"), "empty-config": ("config.yaml", ""),
              "corrupt-status": ("status.json", "{")}
    for name, (file, text) in broken.items():
        run = write_run(tmp_path / "runs" / "broken", "iql", "hopper-medium-v2", 9, older, name=f"iql-{name}")
        (run / file).write_text(text)
        if file == "status.json":
            (run / "results.json").unlink()
    no_config = write_run(tmp_path / "runs" / "broken", "iql", "hopper-medium-v2", 9, older, name="iql-no-config")
    (no_config / "config.yaml").unlink()
    capsys.readouterr()

    # runs/broken lies under runs_root too: overlapping roots read each directory once
    path = report.main([str(runs_root), str(tmp_path / "runs" / "broken"), "--out", str(tmp_path / "r")])
    text = path.read_text()
    mean, std, n, running = parse_cell(table_rows(text)["hopper-medium-v2"]["iql"])
    per_run = [statistics.mean(s for _, s in newest[-10:])] + [
        statistics.mean(s for _, s in fake_evaluations("hopper-medium-v2", "iql", seed)[-10:]) for seed in (1, 2)]
    assert (n, running) == (3, False) and abs(mean - statistics.mean(per_run)) < 0.006
    assert parse_cell(table_rows(text)["hopper-medium-v2"]["cnf"])[2:] == (3, False)  # the dead run is not counted
    left_out = text.split("Left out of the table")[1].split("\n## ")[0]
    assert "seed 0 of iql on hopper-medium-v2 again" in left_out and "seed0-older" in left_out
    assert "iql-hopper-medium-v2-seed0-20250101-000000" in left_out  # the first run: not the newest either
    assert f"`{dead}`" in left_out and "not alive on this host" in left_out
    assert f"python algorithms/cnf.py --resume {dead}" in left_out
    runs_table = text.split("## Runs")[1]
    assert runs_table.count("| died (") == 1 and "| running" not in runs_table

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(broken) + 1 and all(line.startswith("warning: skipped run directory") for line in err)
    assert sum("iql-no-config: no config.yaml" in line for line in err) == 1
    unreadable = text.split("Unreadable run directories, skipped (6)")[1]
    assert all(f"iql-{name}" in unreadable for name in [*broken, "no-config"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert len(summary["skipped"]) == 6 and {e["state"] for e in summary["left_out"]} == {"finished", "died"}


@pytest.mark.parametrize("status, age_s, want", [
    (None, 60, "running"), (None, 3600, "died"),  # older runs without status.json: the 30-minute rule
    ({"state": "running", "pid": "self", "host": "this"}, 3600, "running"),  # alive here, however quiet
    ({"state": "running", "pid": "dead", "host": "this"}, 0, "died"),
    ({"state": "running", "pid": 1, "host": "elsewhere"}, 60, "running"),  # another host: the 30-minute rule
    ({"state": "running", "pid": 1, "host": "elsewhere"}, 3600, "died"),
    ({"state": "interrupted", "pid": 1, "host": "this", "step": 7}, 0, "interrupted"),
    ({"state": "failed", "pid": 1, "host": "this", "error": "boom"}, 0, "failed"),
    ({"state": "finished", "pid": 1, "host": "this"}, 0, "died"),  # results.json gone
])
def test_run_state(tmp_path, status, age_s, want):
    if status is not None:
        status = {**status, "pid": {"self": os.getpid(), "dead": dead_pid()}.get(status["pid"], status["pid"]),
                  "host": socket.gethostname() if status["host"] == "this" else status["host"]}
    run = write_run(tmp_path, "iql", "hopper-medium-v2", 0, [(1, 1.0)], finished=False, status=status, age_s=age_s)
    assert report.run_state(run)[0] == want
    (run / "results.json").write_text("{}")
    assert report.run_state(run)[0] == "finished"


def test_dataset_average_column_and_reference_line(tmp_path):
    import matplotlib.image

    for seed in SEEDS:
        write_run(tmp_path / "runs", "iql", "halfcheetah-medium-gymv5", seed,
                  fake_evaluations("halfcheetah-medium-gymv5", "iql", seed), dataset_score=41.25)
        write_run(tmp_path / "runs", "cnf", "halfcheetah-medium-gymv5", seed,  # in progress: from metrics.jsonl
                  fake_evaluations("halfcheetah-medium-gymv5", "cnf", seed, n=3), finished=False)
    with open(next((tmp_path / "runs").glob("cnf-*")) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"dataset_normalized_score": 41.25}) + "\n")
    out = tmp_path / "r"
    text = report.main([str(tmp_path / "runs"), "--out", str(out)]).read_text()
    row = table_rows(text)["halfcheetah-medium-gymv5"]
    assert set(row) == {"cnf", "iql", "dataset average"} and row["dataset average"] == "41.25"
    with_line = matplotlib.image.imread(out / "learning_curves_halfcheetah-medium-gymv5.png")
    for run in (tmp_path / "runs").glob("iql-*"):  # the same runs without the dataset's average: no line
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "dataset_normalized_score": None}))
    for run in (tmp_path / "runs").glob("cnf-*"):
        (run / "metrics.jsonl").write_text("")
    text = report.main([str(tmp_path / "runs"), "--out", str(out)]).read_text()
    assert "dataset average" not in table_rows(text)["halfcheetah-medium-gymv5"]
    assert not np.array_equal(with_line, matplotlib.image.imread(out / "learning_curves_halfcheetah-medium-gymv5.png"))


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


def test_paper_scores():
    assert report.paper_score("awac", "walker2d-medium-v2") == "78.20"
    assert report.paper_score("cnf", "hopper_medium_replay-v2") == "89.04 ± 10.39"  # a d4rl file stem
    assert report.paper_score("awac", "maze2d-umaze-v1") is None  # "-" in Table 1: the paper reports none
    assert report.paper_score("sfbc", "halfcheetah-medium-v2") == "45.9"  # SfBC's own paper
    assert report.paper_score("iql", "halfcheetah-medium-gymv5") is None
    assert report.paper_score("cnf_vae", "hopper-medium-v2") is None


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
