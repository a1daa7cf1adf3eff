"""`smoe bench train`: dense and smoe-dropout at each k, end to end, each as a ratio to dense."""

import json

import pytest

from smoe.launcher.bench.train import schedule_weights
from smoe.launcher.config import build_config

from runs import SMALL, smoe


def test_bench_train_times_every_k_against_dense_and_reads_finished_runs(corpus, tmp_path):
    args = ["bench", "train", "--preset", "tiny", "--data-file", corpus, "--out", tmp_path / "runs", "--ks", "2,4",
            "--warmup", "1", "--steps", "2", "--json", tmp_path / "bench.json", *SMALL]
    result = smoe(*args)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["method"], r["k"]) for r in report["rows"]] == [("dense", None), ("smoe-dropout", 2),
                                                               ("smoe-dropout", 4)]
    for row in report["rows"]:
        assert row["s_per_step"] > 0 and row["peak_mb"] > 0
    dense, k2, k4 = report["rows"]
    assert k2["time_ratio"] == k2["s_per_step"] / dense["s_per_step"]
    assert 0 < report["mlp_share"] <= 1 and k4["ideal_ratio"] == 1.0  # k = N costs the dense MLP
    assert k2["ideal_ratio"] == pytest.approx(1 - report["mlp_share"] / 2)
    assert report["schedule_ks"] == [2, 4] and report["paper"] == 0.98
    assert "schedule average (k 2 -> 4)" in result.stdout and "x ideal" in result.stdout
    for run in ("dense", "k2", "k4"):  # each run really is its own method at its own k
        config = json.loads((tmp_path / "runs" / run / "config.json").read_text())
        assert (config["method"], config["k_min"], config["k_max"]) == (
            ("dense", 1, 4) if run == "dense" else ("smoe-dropout", int(run[1:]), int(run[1:])))
    again = smoe(*args)  # finished runs are read back, not run again (the MLP share is timed anew)
    assert "smoe.launcher.cli train" not in again.stdout
    assert [(r["s_per_step"], r["peak_mb"]) for r in json.loads((tmp_path / "bench.json").read_text())["rows"]] == \
        [(r["s_per_step"], r["peak_mb"]) for r in report["rows"]]


def test_the_schedule_weights_are_the_steps_spent_at_each_k():
    weights = schedule_weights(build_config("paper"))
    assert sorted(weights) == list(range(8, 17)) and abs(sum(weights.values()) - 1) < 1e-9
    assert weights[8] < weights[12] and abs(weights[8] - weights[16]) < 0.01  # the ends get half a step's share
