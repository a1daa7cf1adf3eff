"""`smoe export` of upcycled decoder LMs as transformers' own MoE classes (Llama and Mistral ->
Mixtral, Qwen3 -> Qwen3-MoE): loaded in the bare environment at every k with smoe's logits and
greedy tokens, under the published checkpoints' tensor names; and what `native_export` refuses (the
remote-code export takes it: test_remote_decoder.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decoders import EXPERTS, HIDDEN, INTERMEDIATE, TOLERANCE, bare_results, export_cases, upcycled
from safetensors import safe_open

from smoe.launcher.cli import main
from smoe.launcher.export.native import native_export
from smoe.model.decoder import Upcycling, save_upcycled

# name -> (architecture, upcycle's keywords, config extras, through `smoe export UPCYCLED_DIR` with a tokenizer)
CASES = {
    "llama": ("llama", {}, {}, True),
    "llama-mean": ("llama", {"combine_scale": 1.0, "top_k": 2}, {}, False),
    "mistral-learned": ("mistral", {"method": "smoe-learned"}, {}, False),
    "qwen3": ("qwen3", {}, {}, True),
    "qwen3-every-2": ("qwen3", {"moe_layers": "every-2", "combine_scale": 1.0}, {"tie_word_embeddings": True}, False),
}
NATIVE = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="session")
def native_exports(tmp_path_factory) -> Path:
    """Each case exported (through the CLI from an upcycled directory, or in memory), with what smoe gives."""
    return export_cases(tmp_path_factory.mktemp("native"), CASES,
                        lambda model, out, top_k: native_export(model, out, top_k=top_k), {"native": True})


@pytest.fixture(scope="session")
def native_results(native_exports, bare_python) -> dict:
    return bare_results(bare_python, native_exports / "cases.json")


@pytest.mark.parametrize("name", CASES)
def test_the_native_export_loads_at_any_k_with_smoes_logits_and_tokens(native_exports, native_results, name):
    case, architecture = native_results[name], CASES[name][0]
    want = torch.load(native_exports / f"{name}.pt")
    assert case["class"] == NATIVE[architecture]
    assert all(info == {} for info in case["loading_info"].values()), case["loading_info"]  # nothing missing/unexpected
    assert case["loaded_k"] == {str(k): [k] for k in range(1, EXPERTS + 1)}  # from_pretrained(num_experts_per_tok=k)
    assert max(case["differences"].values()) <= TOLERANCE, case["differences"]
    assert case["slice_difference"] <= TOLERANCE  # one k per MoE layer, as the card loads it
    assert case["generated"] == {str(k): tokens for k, tokens in want["generated"].items()}
    first, last = want["logits"][1], want["logits"][EXPERTS]
    assert (first - last).abs().max() > 1e-3 * last.abs().max()  # k changes the model: each k is its own check


def test_the_tensors_are_named_and_laid_out_as_the_published_checkpoints(native_exports):
    with safe_open(native_exports / "llama" / "model.safetensors", "pt") as mixtral:
        names = set(mixtral.keys())
        assert mixtral.get_tensor("model.layers.0.block_sparse_moe.gate.weight").dtype == torch.float32
        assert mixtral.get_tensor("model.layers.2.block_sparse_moe.experts.3.w1.weight").shape == (16, HIDDEN)
        assert mixtral.get_tensor("model.layers.2.block_sparse_moe.experts.3.w2.weight").shape == (HIDDEN, 16)
    assert {f"model.layers.1.block_sparse_moe.experts.0.w{i}.weight" for i in (1, 2, 3)} <= names
    assert not any("gate_up_proj" in name or ".mlp." in name for name in names)
    with safe_open(native_exports / "qwen3-every-2" / "model.safetensors", "pt") as qwen:
        names = set(qwen.keys())
    assert {f"model.layers.1.mlp.experts.3.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert "model.layers.1.mlp.gate.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names
    assert "lm_head.weight" not in names  # tied to the embeddings
    config = json.loads((native_exports / "qwen3-every-2" / "config.json").read_text())
    assert {key: config[key] for key in ("mlp_only_layers", "norm_topk_prob", "decoder_sparse_step",
                                         "moe_intermediate_size", "intermediate_size", "num_experts")} == \
        {"mlp_only_layers": [0, 2], "norm_topk_prob": True, "decoder_sparse_step": 1, "moe_intermediate_size": 16,
         "intermediate_size": INTERMEDIATE, "num_experts": EXPERTS}  # as Qwen3-MoE spells it


def test_the_tokenizer_generation_config_and_card_go_with_it(native_exports, native_results):
    out = native_exports / "llama"
    assert native_results["llama"]["tokenized"] == [5, 7, 9]
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == EXPERTS and config["architectures"] == ["MixtralForCausalLM"]
    assert json.loads((native_exports / "llama-mean" / "config.json").read_text())["num_experts_per_tok"] == 2
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "from_pretrained(\"llama\", num_experts_per_tok=4)" in card and "no `trust_remote_code`" in card
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in card.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [row[0] for row in rows] == [str(k) for k in range(1, EXPERTS + 1)]
    flops = [float(row[2]) for row in rows]
    assert flops == sorted(flops) and flops[0] < flops[-1]  # the cost follows k


def test_what_the_native_class_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="attention_bias=True, which MixtralForCausalLM cannot hold: the native "
                                         "export cannot represent"):
        native_export(upcycled("llama", attention_bias=True), tmp_path / "bias")
    with pytest.raises(ValueError, match=r"layers \[0, 2\] of the model are dense, which MixtralForCausalLM cannot "
                                         "hold"):
        native_export(upcycled("mistral", {"moe_layers": "every-2"}), tmp_path / "dense")
    with pytest.raises(ValueError, match="a 'gpt2' model has no native transformers MoE class"):
        native_export(upcycled("gpt2"), tmp_path / "gpt2")
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be between 1 and the model's num_experts"):
        native_export(upcycled("qwen3"), tmp_path / "k", top_k=5)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_and_kept(tmp_path, capsys):
    source = tmp_path / "upcycled"
    save_upcycled(upcycled("llama"), Upcycling(EXPERTS), source)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", str(source), str(taken)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_the_model_is_left_at_its_k_and_mode(tmp_path):
    model = upcycled("mistral", {"top_k": 3}).train()
    native_export(model, tmp_path / "out", top_k=1)
    assert model.training and {layer.top_k for layer in model.modules() if hasattr(layer, "set_top_k")} == {3}
