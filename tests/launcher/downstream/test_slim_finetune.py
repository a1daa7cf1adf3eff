"""Downstream at an expert budget: keeping the B most used experts of every layer
(`smoe slim`) and fine-tuning the slim model (`smoe finetune`)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import smoe.model.bert  # noqa: F401  (registers smoe-bert with transformers' Auto classes)
from smoe.model import MoEConfig, SMoE
from smoe.model.slim import keep_experts, most_used

from runs import MLM
from runs import smoe

LAYER = MoEConfig(d_model=16, d_ff=128, num_experts=8, k=8, dropout=0.0, vocab_size=50, seed=3)


def tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 16, generator=g), torch.randint(0, 50, (40,), generator=g)


@pytest.mark.parametrize("combine_scale", [1.0, 8.0])
@pytest.mark.parametrize("router", ["random-frozen", "learned", "hash"])
def test_keeping_every_expert_changes_nothing(router, combine_scale):
    layer = SMoE(replace(LAYER, router=router, combine_scale=combine_scale)).eval()
    x, ids = tokens()
    torch.testing.assert_close(keep_experts(layer, list(range(8)))(x, ids)[0], layer(x, ids)[0])


@pytest.mark.parametrize("router", ["random-frozen", "hash"])
def test_kept_experts_are_ranked_as_the_full_layer_ranked_them(router):
    layer = SMoE(replace(LAYER, router=router, k=3)).eval()
    keep = [1, 4, 6]
    slim = keep_experts(layer, keep)
    x, ids = tokens(1)
    for new, old in enumerate(keep):
        assert torch.equal(slim.local_experts[new].fc1.weight, layer.local_experts[old].fc1.weight)
    kept = torch.tensor(keep)
    if router == "hash":  # each token's full expert order with the dropped experts taken out
        expected = torch.stack([row[torch.isin(row, kept)] for row in layer.router.table[ids]])
    else:  # the full router's logits of the kept experts, best first
        expected = kept[layer.router.proj(x)[:, keep].argsort(dim=-1, descending=True)]
    assert torch.equal(kept[slim.router(x, ids).expert_ids_TK], expected[:, :3])


def test_a_slim_layer_keeps_the_combine_scale_it_was_trained_with():
    layer = SMoE(replace(LAYER, router="hash", combine_scale=8.0)).eval()
    slim = keep_experts(layer, [0, 2, 5])
    assert slim.deepspeed_moe.combine_scale == 8.0  # N of the trained layer, not of the slim one


def test_most_used_breaks_ties_by_id_and_refuses_bad_budgets():
    assert most_used(torch.tensor([5, 9, 9, 1, 7]), 3) == [1, 2, 4]
    layer = SMoE(LAYER)
    with pytest.raises(ValueError, match="distinct ids"):
        keep_experts(layer, [0, 0])


def test_slim_keeps_the_most_used_experts_and_budget_n_is_the_full_model(bert_run, bert_slim, books, tmp_path):
    from transformers import AutoModelForMaskedLM

    result = smoe("slim", bert_run, "--budget", "2", "--data", books / "a.txt", "--out", tmp_path / "two")
    report = json.loads((tmp_path / "two" / "slim.json").read_text())
    assert report["k"] == 2 and "kept 2 of 4 experts per layer" in result.stdout
    for kept, counts in zip(report["kept"], report["counts"]):
        assert kept == most_used(torch.tensor(counts), 2) and sum(counts) > 0
    full = AutoModelForMaskedLM.from_pretrained(bert_slim(4)).eval()
    two = AutoModelForMaskedLM.from_pretrained(tmp_path / "two").eval()
    assert (two.config.num_experts, two.config.intermediate_size, two.config.top_k) == (2, 32, 2)
    assert len(two.bert.encoder.layer[0].output.block.local_experts) == 2
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    from smoe.launcher.checkpoints.consolidate import full_state_dict
    from smoe.launcher.config import TrainConfig
    from smoe.launcher.families.masked_lm import build_mlm_model
    from smoe.model import set_top_k

    config = TrainConfig.from_dict(json.loads((bert_run / "config.json").read_text()))
    original = build_mlm_model(config, full.config.pad_token_id)
    original.load_state_dict(full_state_dict(bert_run / "checkpoints" / "step000004"))
    set_top_k(original, 4)
    torch.testing.assert_close(full(input_ids=ids).logits, original.eval()(input_ids=ids).logits)


def test_consolidate_works_on_a_bert_run(bert_run, bert_slim, tmp_path):
    from transformers import AutoModelForMaskedLM

    from smoe.launcher.checkpoints.consolidate import load_consolidated
    from smoe.model import set_top_k
    from smoe.model.bert import SMoEBertForMaskedLM

    smoe("ckpt", "consolidate", bert_run, tmp_path / "model.safetensors")
    config, model = load_consolidated(tmp_path / "model.safetensors")  # no run directory, no tokenizer needed
    assert isinstance(model, SMoEBertForMaskedLM) and config.model == "bert" and config.num_experts == 4
    full = AutoModelForMaskedLM.from_pretrained(bert_slim(4)).eval()  # the same weights, another way
    set_top_k(model, 4)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(input_ids=ids).logits, full(input_ids=ids).logits)


def test_slim_refuses_bad_budgets_and_says_what_a_dense_budget_means(bert_run, books, tmp_path):
    result = smoe("slim", bert_run, "--budget", "5", "--data", books / "a.txt", "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "--budget 5 must be between 1 and the run's 4 experts" in result.stderr
    result = smoe("slim", bert_run, "--budget", "2", "--data", tmp_path / "none.tsv", "--out", tmp_path / "x",
                  check=False)
    assert result.returncode == 2 and "none.tsv does not exist" in result.stderr
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("text\tlabel\nhello\t1\n")
    result = smoe("slim", bert_run, "--budget", "2", "--data", wrong, "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "needs a 'sentence' column" in result.stderr
    dense = tmp_path / "dense"
    smoe("train", "--preset", "bert-tiny", "--method", "dense", "--data-files", books, "--out", dense, *MLM)
    result = smoe("slim", dense, "--budget", "2", "--data", books / "a.txt", "--out", tmp_path / "dense2")
    assert "means a dense MLP of width 32, freshly initialised" in result.stdout
    assert json.loads((tmp_path / "dense2" / "slim.json").read_text())["dense_width"] == 32
    result = smoe("slim", dense, "--budget", "4", "--data", books / "a.txt", "--out", tmp_path / "dense4")
    assert "the full budget keeps it whole" in result.stdout


def test_finetune_a_slim_model_on_sst2(bert_slim, sst2, tmp_path):
    result = smoe("finetune", "sst2", "--model", bert_slim(2), "--data", sst2, "--out", tmp_path / "ft",
                  "--epochs", "3", "--lr", "3e-3", "--batch-size", "16", "--k", "1")
    report = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert (report["experts"], report["k"], report["task"]) == (2, 1, "sst2")
    assert json.loads((tmp_path / "ft" / "model" / "config.json").read_text())["top_k"] == 1  # reloads at k = 1
    assert report["dev"]["accuracy"] > 0.9, result.stdout[-2000:]
    assert "ETA" in result.stdout


def test_finetune_refuses_bad_tasks_columns_and_labels(bert_slim, tmp_path):
    data = tmp_path / "sst2"
    data.mkdir()
    args = ["--model", bert_slim(4), "--data", data, "--out", tmp_path / "ft"]
    result = smoe("finetune", "imdb", *args, check=False)
    assert result.returncode == 2
    assert "task 'imdb' is unknown: use one of sst2, csqa, asdiv-a, mawps, svamp" in result.stderr
    (data / "train.tsv").write_text("text\tlabel\nfine\t1\n")
    (data / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    result = smoe("finetune", "sst2", *args, check=False)
    assert result.returncode == 2 and "SST-2 needs 'sentence' and 'label'" in result.stderr
    (data / "train.tsv").write_text("sentence\tlabel\nfine\t1\nodd\t2\n")
    result = smoe("finetune", "sst2", *args, check=False)
    assert result.returncode == 2 and "train.tsv:3: label '2' is not one of SST-2's classes 0, 1" in result.stderr
    (data / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    result = smoe("finetune", "sst2", *args, "--k", "9", check=False)
    assert result.returncode == 2 and "--k 9 must be between 1 and the model's 4 experts" in result.stderr
    assert not (tmp_path / "ft").exists()
