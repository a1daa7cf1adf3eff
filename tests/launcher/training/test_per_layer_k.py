"""`k_sampling=per-layer`: each MoE layer trains at its own k, drawn every step from k_min up to the
schedule's k. Real tiny runs (one process, 2 expert-parallel ranks, a stop and a resume), their
TensorBoard events read back; evaluation stays at one k for every layer."""

from __future__ import annotations

import json

import pytest

from smoe.launcher.cli import main
from smoe.launcher.config import TrainConfig

from runs import scalars, train

PER_LAYER = ["k_sampling=per-layer", "eval_segments=0"]  # validation reads the split the final sweep reads


@pytest.fixture(scope="module")
def per_layer_runs(corpus, tmp_path_factory):
    """The small deterministic model (2 MoE layers, k 1 -> 4 over 8 steps) with per-layer k: straight on one
    process, stopped at step 4 and resumed, and on 2 expert-parallel ranks."""
    root = tmp_path_factory.mktemp("per-layer-k")
    straight = train(root / "straight", corpus, *PER_LAYER)
    train(root / "split", corpus, *PER_LAYER, "--stop-at", "4")
    train(root / "split", corpus, *PER_LAYER, "--resume")
    train(root / "ep2", corpus, *PER_LAYER, "ep_size=2", ranks=2)
    return root, straight.stdout


def test_each_layer_trains_at_its_own_draw_within_the_schedules_range(per_layer_runs):
    root, stdout = per_layer_runs
    out = root / "straight"
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    schedule = config.k_schedule()
    top_k, mean_k = scalars(out, "moe/top_k"), scalars(out, "moe/mean_layer_k")
    layer_ks = {s: [scalars(out, f"moe/layer{layer}/top_k")[s] for layer in (0, 1)] for s in range(1, 9)}
    for s in range(1, 9):  # logged after step s: the ks of step s - 1
        assert top_k[s] == schedule(s - 1)  # TensorBoard's moe/top_k stays the schedule's k
        assert layer_ks[s] == schedule.layer_ks(s - 1, 2, config.seed)
        assert all(config.k_min <= k <= schedule(s - 1) for k in layer_ks[s])
        assert mean_k[s] == pytest.approx(sum(layer_ks[s]) / 2)
    assert any(ks[0] != ks[1] for ks in layer_ks.values())
    assert layer_ks[8] != [4, 4] and "step 8/8 | " in stdout and "| k 4 (" in stdout.split("step 8/8 | ")[1]

    # Validation during training and the final sweep run every layer at one k: at step 8, the schedule's 4.
    rows = {row["k"]: row for row in json.loads((out / "eval.json").read_text())["rows"]}
    assert scalars(out, "val/bpc")[8] == pytest.approx(rows[4]["valid_bpc"], abs=1e-6)


def test_a_resumed_run_draws_the_ks_of_the_uninterrupted_one(per_layer_runs):
    root, _ = per_layer_runs
    straight, split = scalars(root / "straight", "train/loss"), scalars(root / "split", "train/loss")
    assert sorted(split) == list(range(1, 9)) and [split[s] for s in split] == [straight[s] for s in split]
    assert json.loads((root / "split" / "eval.json").read_text()) == \
        json.loads((root / "straight" / "eval.json").read_text())


def test_two_expert_parallel_ranks_draw_the_same_ks(per_layer_runs):
    """Without dropout the 2-rank loss is the 1-process loss only if both ranks ran every layer at the
    1-process run's ks: a rank of its own draws would route its half of the batch otherwise."""
    root, _ = per_layer_runs
    two, one = scalars(root / "ep2", "train/loss"), scalars(root / "straight", "train/loss")
    assert sorted(two) == list(range(1, 9))
    for step, loss in two.items():
        assert loss == pytest.approx(one[step], abs=1e-5)
    assert scalars(root / "ep2", "moe/layer1/top_k") == scalars(root / "straight", "moe/layer1/top_k")


@pytest.mark.parametrize("overrides, message", [
    (["--method", "smoe-learned"], "method smoe-learned has one fixed k (k_fixed=2): use k_sampling=global"),
    (["--method", "dense"], "method dense has no experts: use k_sampling=global"),
    (["k_min=4"], "k_min == k_max (4) gives every layer k 4: lower k_min"),
])
def test_per_layer_k_is_refused_where_there_is_no_range_to_draw_from(capsys, corpus, tmp_path, overrides, message):
    args = ["train", "--out", tmp_path / "x", "--preset", "tiny", "--data-file", corpus, "k_sampling=per-layer",
            "k_max=4", *overrides]
    assert main(list(map(str, args))) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_unknown_k_sampling_is_refused_with_the_choices(capsys, corpus, tmp_path):
    assert main(["train", "--out", str(tmp_path / "x"), "--data-file", str(corpus), "k_sampling=random"]) == 2
    assert "k_sampling 'random' is unknown: use one of global, per-layer" in capsys.readouterr().err
