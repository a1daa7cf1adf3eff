"""Checkpoints across expert-parallel layouts: resume 2 ranks (ep_size 2) -> 1 and 1 -> 2,
consolidate into one safetensors file, and refuse a checkpoint holding the wrong experts.

Dropout is off, so a run continued on another layout must give the losses and the
evaluation of the run continued on the same layout: Adam's moments, the data position,
the lr schedule and the Transformer-XL memory all have to arrive where they are needed.
"""

from __future__ import annotations

import json
import shutil
import zlib

import pytest

from runs import DETERMINISTIC, scalars, smoe, train


def same_continuation(resumed, reference) -> None:
    for step in (7, 8):
        assert scalars(resumed, "train/loss")[step] == pytest.approx(scalars(reference, "train/loss")[step], abs=1e-5)
    rows, reference_rows = (json.loads((d / "eval.json").read_text())["rows"] for d in (resumed, reference))
    assert [r["k"] for r in rows] == [1, 2, 4]
    for row, expected in zip(rows, reference_rows):
        assert row["valid_bpc"] == pytest.approx(expected["valid_bpc"], abs=1e-5)
        assert row["test_bpc"] == pytest.approx(expected["test_bpc"], abs=1e-5)


def test_two_expert_parallel_ranks_resume_on_one(layout_runs, corpus, tmp_path):
    shutil.copytree(layout_runs / "ep2", tmp_path / "run")
    result = train(tmp_path / "run", corpus, "ep_size=1", "--resume")
    assert "resharded from 2 ranks (ep_size 2) to 1 ranks (ep_size 1)" in result.stdout
    assert "Adam moments moved" in result.stdout
    same_continuation(tmp_path / "run", layout_runs / "ep1")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["ep_size"] == 1


def test_one_rank_resumes_on_two_expert_parallel_ranks(layout_runs, corpus, tmp_path):
    shutil.copytree(layout_runs / "ep1-at-6", tmp_path / "run")
    result = train(tmp_path / "run", corpus, "ep_size=2", "--resume", ranks=2)
    assert "resharded from 1 ranks (ep_size 1) to 2 ranks (ep_size 2)" in result.stdout
    same_continuation(tmp_path / "run", layout_runs / "ep1")


def test_consolidated_file_evaluates_like_the_run(layout_runs, tmp_path):
    from smoe.data import OrderedStream, load_corpus
    from smoe.launcher.checkpoints.consolidate import load_consolidated
    from smoe.launcher.evaluation.metrics import LN2, evaluate
    from smoe.model import set_top_k

    smoe("ckpt", "consolidate", layout_runs / "ep2", tmp_path / "model.safetensors")
    smoe("eval", layout_runs / "ep2", "--k", "1,4", "--json", tmp_path / "eval.json")
    expected = {row["k"]: row["valid_bpc"] for row in json.loads((tmp_path / "eval.json").read_text())["rows"]}
    config, model = load_consolidated(tmp_path / "model.safetensors")
    assert config.ep_size == 1 and config.num_experts == 4
    valid = load_corpus(None, config.data_file).valid
    for k in (1, 4):
        set_top_k(model, k)
        stream = OrderedStream(valid, config.eval_batch_size, config.eval_tgt_len, name="valid")
        assert evaluate(model, stream, config.eval_mem_len) / LN2 == pytest.approx(expected[k], abs=1e-5)


def test_a_checkpoint_with_other_experts_is_refused(layout_runs, corpus, tmp_path):
    shutil.copytree(layout_runs / "ep2", tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    # ep_size=1: a resume keeps the saved ep_size 2 unless told, and this is one process
    more_experts = smoe("train", "--out", tmp_path / "run", "--data-file", corpus, *DETERMINISTIC, "num_experts=8",
                        "k_max=8", "ep_size=1", "--resume", check=False)
    assert more_experts.returncode == 2 and "num_experts: saved 4, now 8" in more_experts.stderr
    (checkpoints / "step000006" / "layer_1_expert_3_mp_rank_00_model_states.pt").unlink()
    lost_expert = smoe("train", "--out", tmp_path / "run", "--data-file", corpus, *DETERMINISTIC, "ep_size=1",
                       "--resume", check=False)
    assert lost_expert.returncode == 2
    assert "layer_1_expert_3_mp_rank_00_model_states.pt missing" in lost_expert.stderr
    assert (checkpoints / "latest").read_text() == "step000006"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step000006"]


def test_the_manifest_of_a_two_rank_save_holds_every_rank_s_files(layout_runs):
    """Each rank checksums what it writes and rank 0 gathers the entries: the manifest matches the bytes."""
    tag_dir = layout_runs / "ep2" / "checkpoints" / "step000006"
    files = {p.name: p.read_bytes() for p in tag_dir.iterdir() if p.name != "manifest.json"}
    assert {"rank0.pt", "rank1.pt", "expp_rank_0_mp_rank_00_optim_states.pt",
            "expp_rank_1_mp_rank_00_optim_states.pt"} <= set(files)
    assert json.loads((tag_dir / "manifest.json").read_text())["files"] == {
        name: {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"} for name, data in files.items()}
