"""`smoe slice`: the greedy walk on synthetic costs, and the command on a small trained run: budgets
respected, a slice of equal ks is the uniform k, `smoe eval --k NAME` evaluates the slice, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from runs import card_code, smoe, train
from smoe.launcher.cli import main
from smoe.launcher.evaluation.slice import Budget, Point, best_under, greedy_walk

WEIGHTS = (8.0, 1.0, 6.0)  # how much each layer's loss falls when its k rises


def synthetic_loss(ks):
    return sum(w / k for w, k in zip(WEIGHTS, ks))


def test_the_walk_raises_the_layer_of_best_gain_per_cost_and_stays_within_the_limit():
    evaluated = []

    def loss(ks):
        evaluated.append(ks)
        return synthetic_loss(ks)

    frontier = greedy_walk([1, 2, 4], 3, loss, cost=sum, limit=9)
    assert [p.ks for p in frontier] == [(1, 1, 1), (2, 1, 1), (2, 1, 2), (4, 1, 2), (4, 1, 4)]
    assert all(p.cost <= 9 for p in frontier) and all(sum(ks) <= 9 for ks in evaluated)
    assert [p.loss for p in frontier] == [synthetic_loss(p.ks) for p in frontier]


def test_a_costly_raise_of_small_gain_loses_to_a_cheap_one():
    # Layer 0 gains most in total, but each of its steps costs 10; layer 1's gains are cheaper per cost.
    frontier = greedy_walk([1, 2], 2, synthetic_loss, cost=lambda ks: 10 * ks[0] + 0.01 * ks[1], limit=100)
    assert frontier[1].ks == (1, 2)


def test_a_budget_takes_the_best_point_within_it_and_one_below_the_cheapest_is_refused():
    frontier = [Point((1, 1), 3.0, 2.0), Point((2, 1), 2.0, 3.0), Point((2, 2), 2.5, 4.0)]
    assert best_under(frontier, Budget("params", 4.0, "p")).ks == (2, 1)
    with pytest.raises(ValueError, match=r"below the cheapest slice, k=1/1, which costs 2 active parameters"):
        best_under(frontier, Budget("params", 1.5, "p"))


@pytest.fixture(scope="module")
def sliced(corpus, tmp_path_factory):
    """A small run trained 4 steps, its uniform sweep, and `smoe slice` at a FLOPs and a parameter budget
    half way between k = 1 and k = 4."""
    root = tmp_path_factory.mktemp("slice")
    run = root / "run"
    train(run, corpus, "max_steps=4")
    smoe("eval", run, "--k", "1,2,4,2/2", "--json", root / "sweep.json")
    rows = json.loads((root / "sweep.json").read_text())["rows"]
    gflops = (rows[0]["flops_per_token"] + rows[2]["flops_per_token"]) / 2 / 1e9
    params = (rows[0]["active_params"] + rows[2]["active_params"]) // 2
    smoe("slice", run, "--budget-gflops", f"{gflops:.6g}", "--params", str(params), "--budget-ms", "1e6",
         "--ks", "1,2,4", "--max-batches", "1", "--repeats", "1")
    return run, rows, float(f"{gflops:.6g}"), params


def test_a_slice_of_equal_ks_is_the_uniform_k(sliced):
    _, rows, _, _ = sliced
    uniform, equal = rows[1], rows[3]
    assert (uniform["k"], equal["k"]) == (2, [2, 2])
    assert {**uniform, "k": None} == {**equal, "k": None}


def test_every_slice_and_frontier_point_fits_its_budget(sliced):
    run, rows, gflops, params = sliced
    table = json.loads((run / "slices.json").read_text())
    names = {s["name"]: s for s in table["slices"]}
    assert set(names) == {f"gflops-{gflops:g}", f"params-{params}", "ms-1e+06"}
    assert names[f"gflops-{gflops:g}"]["flops_per_token"] <= gflops * 1e9
    assert names[f"params-{params}"]["active_params"] <= params
    for cost, limit in (("gflops", gflops), ("params", params)):
        frontier = table["frontier"][cost]
        assert frontier[0]["ks"] == [1, 1] and len(frontier) > 1  # the walk moved
        assert all(point[cost] <= limit for point in frontier)
        uniform = [{"ks": [row["k"]] * 2, **row} for row in table["uniform"]]
        cost_of = "flops_per_token" if cost == "gflops" else "active_params"
        scale = 1e9 if cost == "gflops" else 1
        best = min(frontier + [row for row in uniform if row[cost_of] / scale <= limit],
                   key=lambda p: p["calibration_bits"])
        chosen = names[f"gflops-{gflops:g}" if cost == "gflops" else f"params-{params}"]
        assert chosen["ks"] == best["ks"] and chosen["calibration_bits"] == pytest.approx(best["calibration_bits"])
    assert [row["k"] for row in table["uniform"]] == [1, 2, 4]
    assert [row["test_bits"] for row in table["uniform"]] == pytest.approx([row["test_bpc"] for row in rows[:3]])
    assert table["calibration"] == {"split": "valid", "max_batches": 1}


def test_a_latency_budget_walks_on_flops_to_the_end_and_times_every_point(sliced):
    run, *_ = sliced
    table = json.loads((run / "slices.json").read_text())
    frontier = table["frontier"]["ms"]
    assert frontier[0]["ks"] == [1, 1] and frontier[-1]["ks"] == [4, 4] and all(p["ms"] > 0 for p in frontier)
    unlimited = {s["name"]: s for s in table["slices"]}["ms-1e+06"]  # the best calibration of all
    everything = frontier + [{"ks": [row["k"]] * 2, **row} for row in table["uniform"]]
    assert unlimited["calibration_bits"] == pytest.approx(min(p["calibration_bits"] for p in everything))
    assert all(row["batch1_latency_ms"] > 0 for row in table["slices"] + table["uniform"])
    assert table["device"].startswith("CPU")


def test_eval_by_name_evaluates_the_slice(sliced, tmp_path):
    run, _, gflops, _ = sliced
    chosen = {s["name"]: s for s in json.loads((run / "slices.json").read_text())["slices"]}[f"gflops-{gflops:g}"]
    smoe("eval", run, "--k", f"gflops-{gflops:g}", "--json", tmp_path / "named.json")
    row, = json.loads((tmp_path / "named.json").read_text())["rows"]
    assert row["k"] == chosen["ks"]
    assert row["test_bpc"] == pytest.approx(chosen["test_bits"])
    assert (row["flops_per_token"], row["active_params"]) == (chosen["flops_per_token"], chosen["active_params"])


def test_a_budget_below_the_cheapest_slice_is_refused_with_its_cost(sliced):
    run, rows, _, _ = sliced
    before = (run / "slices.json").read_text()
    result = smoe("slice", run, "--budget-gflops", "1e-9", "--ks", "1,2,4", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "below the cheapest slice, k=1/1, which costs" in result.stderr
    assert f"{rows[0]['flops_per_token'] / 1e9:.6g} GFLOPs per token" in result.stderr
    assert (run / "slices.json").read_text() == before


def refusal(argv, capsys) -> str:
    assert main(list(map(str, argv))) == 2
    return capsys.readouterr().err


def test_refusals_before_any_process_group(sliced, tmp_path, capsys):
    run, _, gflops, _ = sliced
    err = refusal(["eval", run, "--k", "2,nope"], capsys)
    assert "'nope' is none of them" in err and f"the run's slices: gflops-{gflops:g}, params-" in err
    dense = tmp_path / "dense"
    dense.mkdir()
    config = json.loads((run / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "method": "dense"}))
    (dense / "checkpoints").mkdir()
    assert "is a dense run (method dense): it has no experts to slice" in refusal(
        ["slice", dense, "--budget-gflops", "1"], capsys)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    assert "is an exported or upcycled model, not a run: the search needs the run's validation split" in refusal(
        ["slice", tmp_path / "export", "--budget-gflops", "1"], capsys)
    (tmp_path / "empty").mkdir()
    assert "is not a run directory" in refusal(["slice", tmp_path / "empty", "--budget-gflops", "1"], capsys)
    assert "must be at least 1" in refusal(["slice", run, "--budget-ms", "5", "--repeats", "0"], capsys)
    assert "needs a budget" in refusal(["slice", run], capsys)
    assert "--name small names one slice, but 2 budgets" in refusal(
        ["slice", run, "--budget-gflops", "1", "2", "--name", "small"], capsys)
    assert "would read as ks" in refusal(["slice", run, "--budget-gflops", "1", "--name", "2/2"], capsys)
    without = tmp_path / "no-slices"
    shutil.copytree(run, without)
    (without / "slices.json").unlink()
    assert "none yet: `smoe slice RUN` names them" in refusal(["eval", without, "--k", "small"], capsys)


@pytest.fixture(scope="module")
def exported(sliced, tmp_path_factory):
    """The sliced run exported (remote code)."""
    out = tmp_path_factory.mktemp("exported") / "out"
    smoe("export", sliced[0], out, "--ks", "1", "--batch", "1", "--repeats", "1")
    return out


def test_the_export_carries_the_slices_and_the_card_loads_one(sliced, exported, monkeypatch):
    """The export checks every slice against smoe (a slice differing fails it); its card's code loads the
    first slice at load time (``layer_top_k``), which the routers then run."""
    run, _, gflops, _ = sliced
    tmp_path = exported.parent
    table = json.loads((tmp_path / "out" / "slices.json").read_text())
    assert table["layers"] == [0, 1] and table["slices"] == json.loads((run / "slices.json").read_text())["slices"]
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "checked against smoe at every k and slice" in card and f"| gflops-{gflops:g} |" in card
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(card_code(card), scope)
    model, ks = scope["model"], scope["ks"]
    assert ks == table["slices"][0]["ks"] and model.top_k == ks
    assert [m.top_k for m in model.modules() if type(m).__name__ == "ExpertMixture"] == ks
    segment = torch.randint(256, (1, 16), generator=torch.Generator().manual_seed(0))
    at_slice = model(input_ids=segment).logits
    model.set_top_k(4)
    assert model.config.layer_top_k is None and not torch.equal(model(input_ids=segment).logits, at_slice)
    model.set_top_k(ks)
    assert torch.equal(model(input_ids=segment).logits, at_slice)
    with pytest.raises(ValueError, match=r"3 ks \(\[1, 2, 4\]\) for a model with 2 expert layers"):
        model.set_top_k([1, 2, 4])
    with pytest.raises(ValueError, match=r"num_experts_per_tok=5 must be between 1"):
        model.set_top_k([1, 5])


def test_bench_infer_times_slices_and_its_budget_picks_among_slices_and_uniform_ks(sliced, exported, tmp_path,
                                                                                     capsys):
    table = json.loads((exported / "slices.json").read_text())
    name = table["slices"][0]["name"]
    args = ["bench", "infer", str(exported), "--ks", "1,4", "--batch", "1", "--length", "8", "--repeats", "1"]
    assert main([*args, "--slice", name, "--json", str(tmp_path / "timed.json")]) == 0
    rows = json.loads((tmp_path / "timed.json").read_text())["rows"]
    assert [(row["setting"], row["k"]) for row in rows] == [("k=1", 1), ("k=4", 4), (name, table["slices"][0]["ks"])]
    assert main([*args, "--budget-gflops", "1", "--json", str(tmp_path / "budget.json")]) == 0
    report = json.loads((tmp_path / "budget.json").read_text())
    quality = {f"k={row['k']}": row["calibration_bits"] for row in table["uniform"] if row["k"] in (1, 4)}
    quality |= {entry["name"]: entry["calibration_bits"] for entry in table["slices"]}
    assert {row["setting"] for row in report["rows"]} == set(quality)  # a budget considers every slice
    assert quality[report["choice"]["setting"]] == min(quality.values())
    capsys.readouterr()
    assert main([*args, "--slice", "nope"]) == 2
    assert f"no slice nope in {exported}/slices.json: it has {name}" in capsys.readouterr().err


def test_report_draws_the_pareto_card_of_every_sliced_run_and_export(sliced, exported, tmp_path):
    run = sliced[0]
    assert main(["report", str(run.parent), str(exported.parent), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"### Slices of {run.parent.name}/{run.name}: test quality" in text
    assert f"### Slices of {exported.parent.name}/{exported.name}: test quality" in text
    table = json.loads((run / "slices.json").read_text())
    for entry in table["slices"] + table["uniform"]:
        assert f"| {entry['test_bits']:.4f} |" in text  # the test split, never the calibration bits
    assert (tmp_path / "report" / "frontier.png").stat().st_size > 0
