"""`smoe train` / `smoe eval` for BERT and RoBERTa masked-LM on small text files: the same
engine, checkpoints, exact resume, TensorBoard and k sweep as Transformer-XL."""

from __future__ import annotations

import json

import pytest

from smoe.launcher.runtime.distributed import free_port

from runs import SMALL_MLM, run, scalars, smoe

MLM = [*SMALL_MLM, "batch_size=8", "eval_ks=1,2,4", "log_every=1", "eval_every=10", "save_every=10", "eval_segments=2",
       "warmup_steps=2", "max_steps=20"]


def train(family: str, books, out, *overrides, options=(), check=True):
    return smoe("train", "--preset", f"{family}-tiny", "--data-files", books, "--out", out, *options, *MLM,
                *overrides, check=check)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_lm_trains_resumes_exactly_and_evaluates_at_every_k(family, books, tmp_path):
    result = train(family, books, tmp_path / "straight")
    assert "bits/token" in result.stdout
    train(family, books, tmp_path / "split", options=["--stop-at", "10"])
    train(family, books, tmp_path / "split", options=["--resume"])
    straight, split = scalars(tmp_path / "straight", "train/loss"), scalars(tmp_path / "split", "train/loss")
    assert sorted(straight) == list(range(1, 21))
    assert split == pytest.approx(straight, abs=1e-6)  # data order, masks and dropout all resume
    assert straight[20] < straight[1]
    report = json.loads((tmp_path / "straight" / "eval.json").read_text())
    assert report["unit"] == "bits/token" and [row["k"] for row in report["rows"]] == [1, 2, 4]
    assert (tmp_path / "straight" / "tokenizer" / "tokenizer.json").is_file()
    smoe("eval", tmp_path / "straight", "--json", tmp_path / "eval.json")
    again = json.loads((tmp_path / "eval.json").read_text())["rows"]
    for row, expected in zip(again, report["rows"]):
        assert row["valid_bpc"] == pytest.approx(expected["valid_bpc"], abs=1e-5)
        assert row["flops_per_token"] == expected["flops_per_token"]
    flops = [row["flops_per_token"] for row in report["rows"]]
    assert flops[0] < flops[1] < flops[2]  # inference cost follows k


def test_two_expert_parallel_ranks_with_thor(books, tmp_path):
    out = tmp_path / "ep2"
    result = run(["deepspeed", "--num_gpus", 2, "--master_port", free_port(), "--module", "smoe.launcher.cli",
                  "train", "--preset", "bert-tiny", "--data-files", books, "--out", out, *MLM, "max_steps=4",
                  "ep_size=2", "--method", "thor"])
    assert "2 rank(s), ep_size 2" in result.stdout
    assert scalars(out, "train/consistency_loss")
    assert len(list((out / "checkpoints" / "step000004").glob("layer_*_expert_*"))) == 2 * 4


def test_bad_masked_lm_input_is_refused(books, tmp_path):
    bigger = tmp_path / "tokenizer"
    train("bert", books, tmp_path / "run", "max_steps=1", "vocab_size=400")
    (tmp_path / "run" / "tokenizer").rename(bigger)
    result = train("bert", books, tmp_path / "small-vocab", "vocab_size=100", options=["--tokenizer", bigger],
                   check=False)
    assert result.returncode == 2 and "the model's vocab_size is 100: set vocab_size=" in result.stderr
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    result = train("roberta", blank, tmp_path / "blank-run", check=False)
    assert result.returncode == 2 and "0 usable" in result.stderr
    result = train("bert", books, tmp_path / "long", "block_size=64", check=False)
    assert result.returncode == 2 and "block_size 64 is longer than the model's 32 positions" in result.stderr
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    result = train("bert", latin, tmp_path / "latin-run", check=False)
    assert result.returncode == 2 and "latin.txt is not utf-8 text" in result.stderr
    assert not any((tmp_path / name).exists() for name in ("small-vocab", "blank-run", "long", "latin-run"))
