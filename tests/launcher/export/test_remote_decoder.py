"""`smoe export` of upcycled decoder LMs that no native transformers MoE class holds (GPT-2, Qwen2, Llama
with layers left dense) through the remote-code path: transformers' own causal LM with smoe's
ExpertMixture in its expert layers, loaded in the bare environment at any k with smoe's logits and
greedy tokens; and what is still refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decoders import EXPERTS, HIDDEN, INTERMEDIATE, TOLERANCE, bare_results, export_cases, upcycled
from safetensors import safe_open

from smoe.launcher.cli import main
from smoe.launcher.export.native import export_decoder
from smoe.model.decoder import Upcycling, save_upcycled
from smoe.model.moe import top_k_of

# name -> (architecture, upcycle's keywords, config extras, through `smoe export UPCYCLED_DIR` with a tokenizer)
CASES = {
    "gpt2-every-2": ("gpt2", {"moe_layers": "every-2"}, {}, True),
    "gpt2": ("gpt2", {"combine_scale": 1.0}, {}, False),
    "qwen2-every-2": ("qwen2", {"moe_layers": "every-2", "method": "smoe-learned", "top_k": 2}, {}, False),
    "llama-every-2": ("llama", {"moe_layers": "every-2"}, {}, True),
}
CLASSES = {"gpt2": "SMoEGPT2LMHeadModel", "qwen2": "SMoEQwen2ForCausalLM", "llama": "SMoELlamaForCausalLM"}


def export_remote(model, out, top_k) -> None:
    assert export_decoder(model, out, top_k=top_k)["remote"]


@pytest.fixture(scope="session")
def remote_exports(tmp_path_factory) -> Path:
    """Each case exported (through the CLI from an upcycled directory, or in memory), with what smoe gives."""
    return export_cases(tmp_path_factory.mktemp("remote"), CASES, export_remote,
                        {"auto_class": "AutoModelForCausalLM", "segments": False})


@pytest.fixture(scope="session")
def remote_results(remote_exports, bare_python) -> dict:
    return bare_results(bare_python, remote_exports / "cases.json")


@pytest.mark.parametrize("name", CASES)
def test_the_remote_export_loads_at_any_k_with_smoes_logits_and_tokens(remote_exports, remote_results, name):
    case, (architecture, upcycling, _, _) = remote_results[name], CASES[name]
    want = torch.load(remote_exports / f"{name}.pt")
    assert case["class"] == CLASSES[architecture]
    assert case["loaded_k"] == 1 and case["router_ks"] == [1]  # from_pretrained(num_experts_per_tok=1)
    assert max(case["differences"].values()) <= TOLERANCE, case["differences"]  # after set_top_k(k), each k
    assert case["slice_difference"] <= TOLERANCE  # one k per MoE layer, as the card loads it
    assert case["generated"] == {str(k): tokens for k, tokens in want["generated"].items()}
    assert f"num_experts_per_tok={EXPERTS + 1} must be between 1 and the model's num_experts" in case["refused"]
    frozen = upcycling.get("method", "smoe-dropout") == "smoe-dropout"
    assert case["bf16_buffers"] == (["torch.float32"] if frozen else [])  # the frozen projection stays fp32
    first, last = want["logits"][1], want["logits"][EXPERTS]
    assert (first - last).abs().max() > 1e-3 * last.abs().max()  # k changes the model: each k is its own check


def test_the_config_is_the_dense_one_plus_the_experts(remote_exports):
    config = json.loads((remote_exports / "gpt2-every-2" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_smoe.SMoEGPT2Config",
                                  "AutoModelForCausalLM": "modeling_smoe.SMoEGPT2LMHeadModel"}
    assert config["model_type"] == "smoe-dropout-gpt2" and config["architectures"] == ["SMoEGPT2LMHeadModel"]
    assert {key: config[key] for key in ("n_embd", "n_inner", "n_layer", "activation_function")} == \
        {"n_embd": HIDDEN, "n_inner": INTERMEDIATE, "n_layer": 3, "activation_function": "gelu_new"}
    assert {key: config[key] for key in ("num_experts", "num_experts_per_tok", "router", "expert_layers",
                                         "combine_scale", "moe_intermediate_size", "expert_activation",
                                         "gated_experts", "expert_bias", "output_bias")} == \
        {"num_experts": EXPERTS, "num_experts_per_tok": EXPERTS, "router": "random-frozen", "expert_layers": [1],
         "combine_scale": float(EXPERTS), "moe_intermediate_size": INTERMEDIATE // EXPERTS,
         "expert_activation": "gelu_tanh", "gated_experts": False, "expert_bias": True, "output_bias": True}
    qwen2 = json.loads((remote_exports / "qwen2-every-2" / "config.json").read_text())
    assert (qwen2["num_experts_per_tok"], qwen2["router"], qwen2["gated_experts"]) == (2, "learned", True)


def test_the_tensors_are_the_dense_models_and_the_mixtures(remote_exports):
    with safe_open(remote_exports / "gpt2-every-2" / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        assert weights.get_tensor("transformer.h.1.mlp.moe.experts.3.fc1.weight").shape == (16, HIDDEN)
        assert weights.get_tensor("transformer.h.1.mlp.output_bias").shape == (HIDDEN,)  # once, not per expert
    assert "transformer.h.1.mlp.moe.router.proj.weight" in names and "transformer.h.0.mlp.c_fc.weight" in names
    assert not any("deepspeed" in name or "experts.0.fc2.bias" in name or "h.1.mlp.c_" in name for name in names)


def test_the_tokenizer_modelling_file_and_card_go_with_it(remote_exports, remote_results):
    out = remote_exports / "llama-every-2"
    assert remote_results["llama-every-2"]["tokenized"] == [5, 7, 9]
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert 'slimmable_decoder("llama")' in (out / "modeling_smoe.py").read_text()  # smoe.model.hub, copied
    card = (out / "README.md").read_text()
    assert 'from_pretrained("llama-every-2", trust_remote_code=True, num_experts_per_tok=4)' in card
    assert "every layer but [0, 2]" in card and "- llama\n" in card
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in card.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [row[0] for row in rows] == [str(k) for k in range(1, EXPERTS + 1)]
    flops = [float(row[2]) for row in rows]
    assert flops == sorted(flops) and flops[0] < flops[-1]  # the cost follows k


def test_a_bf16_training_model_exports_in_fp32_and_is_left_as_it_was(tmp_path):
    model = upcycled("gpt2", {"top_k": 3}).to(torch.bfloat16).train()
    facts = export_decoder(model, tmp_path / "out", top_k=1)
    assert facts["remote"] and facts["max_difference"] <= TOLERANCE
    assert model.training and top_k_of(model) == 3 and next(model.parameters()).dtype == torch.bfloat16
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("transformer.h.0.mlp.moe.experts.0.fc1.weight").dtype == torch.float32
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 1


@pytest.mark.parametrize("architecture, extra, fields", [
    ("llama", {"attention_bias": True, "mlp_bias": True}, {"expert_bias": True, "output_bias": True}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8}, {"expert_bias": False, "output_bias": False}),
])
def test_what_the_native_class_cannot_hold_exports_with_remote_code(tmp_path, architecture, extra, fields):
    facts = export_decoder(upcycled(architecture, **extra), tmp_path / "out")  # loaded back and checked at every k
    assert facts["remote"] and facts["architecture"] == f"SMoE{architecture.title()}ForCausalLM"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {key: config[key] for key in fields} == fields and all(config[key] == value for key, value in extra.items())


def test_what_no_export_can_hold_is_refused(tmp_path, capsys):
    source = tmp_path / "upcycled"
    save_upcycled(upcycled("qwen2", {"method": "random"}), Upcycling(EXPERTS, method="random"), source)
    assert main(["export", str(source), str(tmp_path / "out")]) == 2
    assert "layer 0: its router 'random' draws new experts at every call" in capsys.readouterr().err
    with pytest.raises(ValueError, match="layer 0: its experts live on several ranks"):
        export_decoder(upcycled("gpt2", {"ep_size": 2}), tmp_path / "ranks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upcycled"]  # nothing written
