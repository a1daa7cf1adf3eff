"""`smoe bench quality`: methods over seeds, the tables and their statistics."""

from __future__ import annotations

import json

import pytest

from runs import SMALL, smoe


def test_bench_quality_table(corpus, tmp_path, capsys):
    result = smoe("bench", "quality", "--data-file", corpus, "--out", tmp_path / "q", "--seeds", "0,1", "--jobs", "2",
                  "--methods", "smoe-dropout:combine_scale=N,dense", "--json", tmp_path / "q.json",
                  "--markdown", tmp_path / "q.md", *SMALL, "max_steps=3")
    table = result.stdout[result.stdout.index("test BPC on corpus.txt"):]
    assert "k=1" in table and "k=4" in table and "s/step" in table and "seeds 0, 1" in table
    assert "| smoe-dropout:combine_scale=N |" in table and "paired difference to dense" in table
    assert (tmp_path / "q.md").read_text() in result.stdout
    results = json.loads((tmp_path / "q.json").read_text())
    assert [m["method"] for m in results["methods"]] == ["smoe-dropout:combine_scale=N", "dense"]
    smoe_dropout, dense = results["methods"]
    assert [r["seed"] for r in smoe_dropout["runs"]] == [0, 1]
    assert json.loads((tmp_path / "q" / "smoe-dropout:combine_scale=N" / "seed-1" / "config.json").read_text())[
        "combine_scale"] == "4"
    assert all(r["s_per_step"] > 0 for m in results["methods"] for r in m["runs"])
    paired = smoe_dropout["paired_vs_dense"]["4"]
    dense_bpc = [r["rows"][0]["test_bpc"] for r in dense["runs"]]
    at_4 = [next(row["test_bpc"] for row in r["rows"] if row["k"] == 4) for r in smoe_dropout["runs"]]
    assert paired["values"] == pytest.approx([a - d for a, d in zip(at_4, dense_bpc)])
    # a second call reads the finished runs instead of training them again
    again = smoe("bench", "quality", "--data-file", corpus, "--out", tmp_path / "q", "--seeds", "0,1",
                 "--methods", "smoe-dropout:combine_scale=N,dense", *SMALL, "max_steps=3")
    assert "$ " not in again.stdout and table in again.stdout


def test_bench_quality_stops_with_a_message_when_a_run_fails(corpus, tmp_path):
    result = smoe("bench", "quality", "--data-file", corpus, "--out", tmp_path / "q", "--methods", "dense,smoe-dropout",
                  *SMALL, "tgt_len=100000", check=False)  # the data is too short: found by the run, not before
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"the run in {tmp_path / 'q' / 'dense' / 'seed-default'} failed (exit 2)" in result.stderr
    assert "the same command continues the unfinished runs" in result.stderr
    assert not (tmp_path / "q" / "smoe-dropout").exists()  # nothing started after the failure


def test_bench_quality_statistics_pair_seeds_and_count_monotone_curves():
    from smoe.launcher.bench.quality import Variant, summarize, tables

    def run(seed, bpc):
        rows = [{"k": k, "test_bpc": b} for k, b in bpc.items()] if isinstance(bpc, dict) else \
            [{"k": None, "test_bpc": bpc}]
        return {"seed": seed, "s_per_step": 0.1, "rows": rows}

    dense = [run(0, 3.0), run(1, 3.2), run(2, 3.1)]
    smoe_runs = [run(0, {1: 3.5, 16: 2.9}), run(1, {1: 3.6, 16: 3.0}), run(2, {1: 3.4, 16: 3.5})]
    summary = summarize(Variant.parse("smoe-dropout:combine_scale=N"), smoe_runs, dense)
    assert summary["by_k"]["16"]["mean"] == pytest.approx(3.1333333)
    assert summary["by_k"]["16"]["sd"] == pytest.approx(0.3214550)  # sample sd over the three seeds
    paired = summary["paired_vs_dense"]["16"]
    assert paired["values"] == pytest.approx([-0.1, -0.2, 0.4])  # seed by seed, not mean minus mean
    assert paired["better_seeds"] == 2
    assert summary["monotone_seeds"] == 2  # seed 2 gets worse from k = 1 to 16
    dense_summary = summarize(Variant.parse("dense"), dense, None)
    text = tables({"unit": "BPC", "source": "s", "preset": "tiny", "seeds": [0, 1, 2],
                   "methods": [summary, dense_summary]})
    assert "| smoe-dropout:combine_scale=N | 3.5000 ± 0.1000 | 3.1333 ± 0.3215 | 2/3 seeds |" in text
    assert "| dense | 3.1000 ± 0.1000 (one model) |" in text
    assert "+0.0333 ± 0.3215 (2/3, t=0.2)" in text
