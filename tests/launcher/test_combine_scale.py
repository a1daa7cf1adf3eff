"""The combine scale (1: the paper's mean of k experts; N: inverted dropout) from the config
to every layer, saved with the run and honoured by everything that reads a run back."""

import json

import pytest
import torch

from smoe.launcher.checkpoints.consolidate import load_consolidated
from smoe.launcher.checkpoints.run_dir import RunDir
from smoe.launcher.config import build_config, parse_override
from smoe.launcher.downstream.slim import slim_config
from smoe.launcher.families.transformer_xl import build_model
from smoe.model import moe_layers_of
from smoe.model.feedforward import METHODS

from runs import SMALL, smoe

OVERRIDES = dict(parse_override(o) for o in SMALL)


@pytest.mark.parametrize("text, number", [("N", "4"), ("n", "4"), ("1", "1"), ("2.5", "2.5"), ("4.0", "4")])
def test_the_scale_is_resolved_to_the_number_every_layer_uses(text, number):
    config = build_config("tiny", {**OVERRIDES, "combine_scale": text})
    assert config.combine_scale == number
    assert {layer.deepspeed_moe.combine_scale for layer in moe_layers_of(build_model(config))} == {float(number)}


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if not spec.dense])
def test_the_default_is_inverted_dropout_for_transformer_xl_and_the_papers_for_masked_lm(method):
    assert build_config("tiny", {**OVERRIDES, "method": method}).combine_scale == "4"
    for preset in ("bert-tiny", "roberta-tiny"):
        assert build_config(preset, {"method": method, "data_files": ("x.txt",)}).combine_scale == "1"
    assert build_config("bert-tiny", {"method": method, "combine_scale": "N"}).combine_scale == "16"


def test_a_slimmed_config_keeps_the_scale_it_was_trained_with():
    config = build_config("tiny", {**OVERRIDES, "combine_scale": "N"})
    assert slim_config(config, budget=2, k=2).combine_scale == "4"  # N of the run, not of the slim model


def test_a_run_saved_before_the_option_loads_with_the_papers_scale(tmp_path):
    config = build_config("tiny", {**OVERRIDES, "combine_scale": "N"}).to_dict()
    del config["combine_scale"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert RunDir(tmp_path).load_config().combine_scale == "1"


def test_eval_and_consolidate_use_the_scale_the_run_was_trained_with(corpus, tmp_path):
    run = tmp_path / "run"
    smoe("train", "--data-file", corpus, "--out", run, *SMALL, "max_steps=2", "combine_scale=N", "dropout=0.0")
    assert json.loads((run / "config.json").read_text())["combine_scale"] == "4"
    trained = {row["k"]: row["test_bpc"] for row in json.loads((run / "eval.json").read_text())["rows"]}
    smoe("eval", run, "--k", "1,4", "--json", tmp_path / "again.json")
    again = {row["k"]: row["test_bpc"] for row in json.loads((tmp_path / "again.json").read_text())["rows"]}
    assert again[1] == pytest.approx(trained[1], abs=1e-6) and again[4] == pytest.approx(trained[4], abs=1e-6)

    smoe("ckpt", "consolidate", run, tmp_path / "model.safetensors")
    config, model = load_consolidated(tmp_path / "model.safetensors")
    assert config.combine_scale == "4"
    assert {layer.deepspeed_moe.combine_scale for layer in moe_layers_of(model)} == {4.0}
    # the same weights at the paper's scale compute something else: the scale is part of the model
    paper = build_model(build_config("tiny", {**config.to_dict(), "combine_scale": "1"}))
    paper.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (2, 16))
    assert not torch.allclose(paper.eval()(ids).logits, model(ids).logits)


def scales(model) -> set[float]:
    return {layer.deepspeed_moe.combine_scale for layer in moe_layers_of(model)}


def test_transformers_directories_carry_the_scale_and_older_ones_load_with_1(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from smoe.model.bert import SMoEBertConfig, SMoEBertForMaskedLM

    config = SMoEBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, num_experts=4, combine_scale=4.0)
    SMoEBertForMaskedLM(config).save_pretrained(tmp_path / "new")
    assert scales(AutoModelForSequenceClassification.from_pretrained(tmp_path / "new", num_labels=2)) == {4.0}
    written = json.loads((tmp_path / "new" / "config.json").read_text())
    del written["combine_scale"]
    (tmp_path / "new" / "config.json").write_text(json.dumps(written))
    assert scales(AutoModelForSequenceClassification.from_pretrained(tmp_path / "new", num_labels=2)) == {1.0}


def test_a_transformer_xl_task_model_keeps_the_runs_scale(tmp_path):
    from smoe.launcher.checkpoints.consolidate import save_consolidated
    from smoe.launcher.downstream.tasks.txl_classifier import TransformerXLClassifier

    config = build_config("tiny", {**OVERRIDES, "combine_scale": "N"})
    save_consolidated(build_model(config), config, tmp_path / "model" / "model.safetensors")
    classifier = TransformerXLClassifier.from_pretrained(tmp_path / "model", ["a b c"], num_labels=2, max_length=8)
    assert scales(classifier) == {4.0}
