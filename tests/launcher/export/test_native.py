"""`smoe export` of upcycled decoder LMs as transformers' own MoE classes (Llama and Mistral ->
Mixtral, Qwen3 -> Qwen3-MoE): loaded in the bare environment at every k with smoe's logits and
greedy tokens, under the published checkpoints' tensor names; and what it refuses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

from smoe.launcher.cli import main
from smoe.launcher.export.native import native_export
from smoe.launcher.export.verify import padded_ids
from smoe.model.decoder import Upcycling, save_upcycled, upcycle
from smoe.model.moe import set_top_k

HERE = Path(__file__).parent
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, EXPERTS = 101, 32, 64, 3, 4
GATED = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda **extra: LlamaConfig(**GATED, **extra),
    "mistral": lambda **extra: MistralConfig(**GATED, **extra),
    "qwen2": lambda **extra: Qwen2Config(**GATED, **extra),
    "qwen3": lambda **extra: Qwen3Config(**GATED, head_dim=8, **extra),
    "gpt2": lambda **extra: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS,
                                       n_head=4, n_positions=64, **extra),
}
# name -> (architecture, upcycle's keywords, config extras, through `smoe export UPCYCLED_DIR` with a tokenizer)
CASES = {
    "llama": ("llama", {}, {}, True),
    "llama-mean": ("llama", {"combine_scale": 1.0, "top_k": 2}, {}, False),
    "mistral-learned": ("mistral", {"method": "smoe-learned"}, {}, False),
    "qwen3": ("qwen3", {}, {}, True),
    "qwen3-every-2": ("qwen3", {"moe_layers": "every-2", "combine_scale": 1.0}, {"tie_word_embeddings": True}, False),
}
NATIVE = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}
TEXT = "w5 w7 w9"
TOLERANCE = 1e-5


def upcycled(architecture: str, upcycling: dict | None = None, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(CONFIGS[architecture](**extra))
    return upcycle(dense, num_experts=EXPERTS, **(upcycling or {})).eval()


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of the model's vocabulary ("w0" ... "w100") and a generation config."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", bos_token="w1",
                            eos_token="w2").save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(directory)


@torch.no_grad()
def expected(model) -> dict:
    """smoe's logits at every k, and its greedy continuation of a prompt."""
    inputs = padded_ids(VOCAB, (2, 16))
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    logits, generated = {}, {}
    for k in range(1, EXPERTS + 1):
        set_top_k(model, k)
        logits[k] = model(**inputs).logits
        generated[k] = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    return {"inputs": inputs, "logits": logits, "prompt": prompt, "new_tokens": 5, "generated": generated}


@pytest.fixture(scope="session")
def native_exports(tmp_path_factory) -> Path:
    """Each case exported (through the CLI from an upcycled directory, or in memory), with what smoe gives."""
    root = tmp_path_factory.mktemp("native")
    cases = {}
    for name, (architecture, upcycling, extra, from_directory) in CASES.items():
        model = upcycled(architecture, upcycling, **extra)
        out = root / name
        if from_directory:
            source = root / f"{name}-upcycled"
            save_upcycled(model, Upcycling(EXPERTS, **upcycling), source)
            save_tokenizer(source)
            assert main(["export", str(source), str(out)]) == 0
        else:
            native_export(model, out, top_k=upcycling.get("top_k"))
        torch.save(expected(model), root / f"{name}.pt")
        cases[name] = {"dir": str(out), "native": True, "expected": str(root / f"{name}.pt"),
                       **({"text": TEXT} if from_directory else {})}
    (root / "cases.json").write_text(json.dumps(cases))
    return root


@pytest.fixture(scope="session")
def native_results(native_exports, bare_python) -> dict:
    result = subprocess.run([str(bare_python), "-I", str(HERE / "bare_check.py"), str(native_exports / "cases.json")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["importable"] == {"smoe": False, "deepspeed": False, "datasets": False}
    return report["cases"]


@pytest.mark.parametrize("name", CASES)
def test_the_native_export_loads_at_any_k_with_smoes_logits_and_tokens(native_exports, native_results, name):
    case, architecture = native_results[name], CASES[name][0]
    want = torch.load(native_exports / f"{name}.pt")
    assert case["class"] == NATIVE[architecture]
    assert all(info == {} for info in case["loading_info"].values()), case["loading_info"]  # nothing missing/unexpected
    assert case["loaded_k"] == {str(k): [k] for k in range(1, EXPERTS + 1)}  # from_pretrained(num_experts_per_tok=k)
    assert max(case["differences"].values()) <= TOLERANCE, case["differences"]
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


@pytest.mark.parametrize("architecture", ["gpt2", "qwen2"])
def test_architectures_without_a_native_class_are_refused(architecture, tmp_path, capsys):
    source = tmp_path / "upcycled"
    save_upcycled(upcycled(architecture), Upcycling(EXPERTS), source)
    assert main(["export", str(source), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"a '{architecture}' model has no native transformers MoE class" in error
    assert "remote-code export of upcycled decoder LMs is not built yet" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upcycled"]  # nothing written


def test_what_the_native_class_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="attention_bias=True, which MixtralForCausalLM cannot hold: the native "
                                         "export cannot represent"):
        native_export(upcycled("llama", attention_bias=True), tmp_path / "bias")
    with pytest.raises(ValueError, match=r"layers \[0, 2\] of the model are dense and MixtralForCausalLM cannot "
                                         "hold it"):
        native_export(upcycled("mistral", {"moe_layers": "every-2"}), tmp_path / "dense")
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
