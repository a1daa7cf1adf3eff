"""BERT and RoBERTa masked-LM with our feed-forward blocks: transformers' modules around
them, save/load round trips, and `smoe convert` from a dense checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from smoe.model.bert import MODELS
from smoe.model.encoder import ExpertFeedForward, aux_loss, expert_counts
from smoe.model.feedforward import METHODS

from runs import smoe

SHAPE = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=40)


def tiny(family: str, **fields):
    config_class, model_class = MODELS[family]
    return model_class(config_class(**SHAPE, **{"num_experts": 4, "top_k": 2, **fields}))


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 120, (3, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_lm_outputs_and_expert_counts(family):
    model = tiny(family).eval()
    ids = inputs()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (3, 12, 120) and out.loss.ndim == 0
    assert aux_loss(model) == 0  # a frozen router has no balance loss
    assert [int(c.sum()) for c in expert_counts(model)] == [3 * 12 * 2] * 2  # every token to k = 2 experts
    for layer in model.base_model.encoder.layer:
        assert isinstance(layer.intermediate, torch.nn.Identity)
        assert isinstance(layer.output, ExpertFeedForward)


def test_the_layer_keeps_bert_dropout_residual_and_layernorm():
    model = tiny("bert").eval()
    sublayer = model.bert.encoder.layer[0].output
    x, residual = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    y, _, _ = sublayer.block(x, None)
    torch.testing.assert_close(sublayer(x, residual), sublayer.LayerNorm(y + residual))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_a_step(method):
    model = tiny("bert", method=method, top_k=1 if method == "thor" else 2, moe_layers="every-2")
    ids = inputs()
    loss = model(input_ids=ids, labels=ids).loss + aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    kinds = [type(layer.output.block).__name__ for layer in model.bert.encoder.layer]
    assert kinds[0] == "DenseFFN" and kinds[1] == ("DenseFFN" if METHODS[method].dense else "SMoE")


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_save_pretrained_and_from_pretrained_round_trip(family, tmp_path):
    model = tiny(family, method="hash", moe_layers="later", num_experts=8, top_k=3).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert (loaded.config.method, loaded.config.num_experts, loaded.config.top_k, loaded.config.moe_layers) == \
        ("hash", 8, 3, "later")
    torch.testing.assert_close(loaded(input_ids=inputs()).logits, model(input_ids=inputs()).logits)


def test_router_options_round_trip_and_older_flat_fields_still_load(tmp_path):
    import json

    from smoe.model.moe import moe_layers_of

    def options_of(path):
        gates = [layer.deepspeed_moe.gate for layer in moe_layers_of(AutoModelForMaskedLM.from_pretrained(path))]
        return {(g.balance_coef, g.z_loss_coef) for g in gates}

    tiny("bert", method="smoe-learned", router_options={"balance_coef": 0.5, "z_loss_coef": 0.25}).save_pretrained(
        tmp_path)
    assert options_of(tmp_path) == {(0.5, 0.25)}
    # A directory written when the options were flat fields of the config.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["router_options"]
    (tmp_path / "config.json").write_text(json.dumps({**saved, "balance_coef": 0.125, "z_loss_coef": 0.0625}))
    assert options_of(tmp_path) == {(0.125, 0.0625)}


@pytest.mark.parametrize("family, dense_class, config_class",
                         [("bert", BertForMaskedLM, BertConfig), ("roberta", RobertaForMaskedLM, RobertaConfig)])
def test_convert_splits_a_dense_checkpoint_into_experts(family, dense_class, config_class, tmp_path):
    torch.manual_seed(0)
    dense = dense_class(config_class(**SHAPE)).eval()
    dense.save_pretrained(tmp_path / "dense")
    result = smoe("convert", tmp_path / "dense", tmp_path / "smoe", "--num-experts", "4", "--method", "hash")
    assert "no tokenizer" in result.stdout
    converted = AutoModelForMaskedLM.from_pretrained(tmp_path / "smoe").eval()
    assert converted.config.num_experts == 4 and converted.config.top_k == 4
    assert len(converted.base_model.encoder.layer[1].output.block.local_experts) == 4
    # hash routing at k = N weighs every expert 1/N: the converted model is the dense one
    torch.testing.assert_close(converted(input_ids=inputs()).logits, dense(input_ids=inputs()).logits,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", ["1", "N"])
def test_a_converted_model_is_the_dense_one_at_k_n_whatever_the_combine_scale(scale, tmp_path):
    torch.manual_seed(0)
    dense = BertForMaskedLM(BertConfig(**SHAPE)).eval()
    dense.save_pretrained(tmp_path / "dense")
    result = smoe("convert", tmp_path / "dense", tmp_path / "smoe", "--num-experts", "4", "--method", "hash",
                  "--combine-scale", scale)
    assert f"combine_scale={1 if scale == '1' else 4}" in result.stdout
    converted = AutoModelForMaskedLM.from_pretrained(tmp_path / "smoe").eval()
    assert converted.config.combine_scale == (1.0 if scale == "1" else 4.0)
    # the layer scales the weights, so the experts must not be scaled again: once, in one place
    expert = converted.base_model.encoder.layer[0].output.block.local_experts[0]
    slice_ = dense.base_model.encoder.layer[0].output.dense.weight[:, :SHAPE["intermediate_size"] // 4]
    torch.testing.assert_close(expert.fc2.weight, slice_ * (4.0 if scale == "1" else 1.0))
    torch.testing.assert_close(converted(input_ids=inputs()).logits, dense(input_ids=inputs()).logits,
                               rtol=1e-4, atol=1e-5)


def test_convert_copies_the_tokenizer(tmp_path):
    from smoe.data.mlm import train_tokenizer

    BertForMaskedLM(BertConfig(**SHAPE)).save_pretrained(tmp_path / "dense")
    tokenizer = train_tokenizer(["the lazy dog sleeps", "a quick fox jumps"] * 20, "bert", vocab_size=120)
    tokenizer.save_pretrained(tmp_path / "dense")
    smoe("convert", tmp_path / "dense", tmp_path / "smoe", "--num-experts", "8", "--k", "2")
    from transformers import AutoTokenizer

    copied = AutoTokenizer.from_pretrained(tmp_path / "smoe")
    assert copied("lazy fox")["input_ids"] == tokenizer("lazy fox")["input_ids"]
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "smoe").config.top_k == 2


def test_convert_refuses_n_not_dividing_the_intermediate_size(tmp_path):
    BertForMaskedLM(BertConfig(**SHAPE)).save_pretrained(tmp_path / "dense")
    result = smoe("convert", tmp_path / "dense", tmp_path / "out", "--num-experts", "5", check=False)
    assert result.returncode == 2
    assert "intermediate_size (64) is not divisible by num_experts (5)" in result.stderr
    assert not (tmp_path / "out").exists()
