"""`smoe upcycle` (and its alias `smoe convert`) through the command line's own entry point, on tiny
random-weight models saved with save_pretrained: every decoder architecture exact at k = N when
loaded back, the splits, what goes along, and every refusal leaving nothing behind."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, OPTConfig, PreTrainedTokenizerFast

from smoe.launcher import cli
from smoe.launcher.downstream import upcycle as upcycle_command
from smoe.model.decoder import Upcycling, load_upcycled
from smoe.model.moe import moe_layers_of, set_top_k

from runs import DECODER_HIDDEN, DECODER_INTERMEDIATE, DECODER_VOCAB, DECODERS, decoder_config

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, N = DECODER_VOCAB, DECODER_HIDDEN, DECODER_INTERMEDIATE, 2, 4
CONFIGS = {architecture: (lambda a=architecture: decoder_config(a, LAYERS)) for architecture in DECODERS}


def save_dense(config, directory, tokenizer: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config).eval()
    dense.save_pretrained(directory)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers

        words = Tokenizer(models.WordLevel({"[UNK]": 0, "lazy": 1, "fox": 2}, unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(directory)
    return dense


def relative_error(model, dense) -> float:
    ids = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = dense(ids).logits
        return float((model(ids).logits - reference).abs().max() / reference.abs().max())


def expert_neurons(model, dense, layer: int = 0) -> list[set[int]]:
    """Which dense neurons (rows of the gate projection) each expert of ``layer`` holds."""
    gate_HD = dense.model.layers[layer].mlp.gate_proj.weight
    experts = moe_layers_of(model)[layer].local_experts
    return [{int((gate_HD == row).all(1).nonzero()) for row in expert.fc1.weight[:expert.d_ff]} for expert in experts]


@pytest.mark.parametrize("architecture", CONFIGS)
def test_every_decoder_architecture_upcycles_exact_at_k_equal_n(architecture, tmp_path, capsys):
    dense = save_dense(CONFIGS[architecture](), tmp_path / "dense", tokenizer=architecture == "gpt2")
    assert cli.main(["upcycle", tmp_path / "dense", tmp_path / "out", "--num-experts", N, "--k", 2]) == 0
    summary = capsys.readouterr().out
    model = load_upcycled(tmp_path / "out").eval()
    assert Upcycling.read(tmp_path / "out") == Upcycling(N, top_k=2, split="random")
    set_top_k(model, N)
    assert relative_error(model, dense) < 1e-4
    parameters = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert f"parameters {parameters(dense):,} dense -> {parameters(model):,} upcycled" in summary
    assert f"{N} experts in {LAYERS} of {LAYERS} layers" in summary
    difference = float(re.search(r"matches the dense logits to (\S+) \(relative\)", summary).group(1))
    assert difference < 1e-4
    assert (tmp_path / "out" / "generation_config.json").is_file()
    if architecture == "gpt2":
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(tmp_path / "out")("lazy fox")["input_ids"] == [1, 2]
    else:
        assert "has no tokenizer" in summary


def test_the_splits_are_all_exact_and_share_the_neurons_out_differently(tmp_path):
    dense = save_dense(CONFIGS["llama"](), tmp_path / "dense")
    neurons = {}
    for split in ("random", "kmeans", "contiguous"):
        assert cli.main(["upcycle", tmp_path / "dense", tmp_path / split, "--num-experts", N, "--split", split]) == 0
        assert Upcycling.read(tmp_path / split).split == split
        model = load_upcycled(tmp_path / split).eval()
        assert relative_error(model, dense) < 1e-4
        neurons[split] = expert_neurons(model, dense)
        assert sorted(len(s) for s in neurons[split]) == [INTERMEDIATE // N] * N
        assert set().union(*neurons[split]) == set(range(INTERMEDIATE))  # every neuron, once
    width = INTERMEDIATE // N
    assert neurons["contiguous"] == [set(range(i * width, (i + 1) * width)) for i in range(N)]
    assert neurons["random"] != neurons["contiguous"]
    assert sorted(map(sorted, neurons["kmeans"])) != sorted(map(sorted, neurons["random"]))


def test_convert_is_the_same_command(tmp_path):
    """`smoe convert` takes a decoder LM too, and writes what `smoe upcycle` writes."""
    save_dense(CONFIGS["qwen3"](), tmp_path / "dense")
    assert cli.main(["convert", tmp_path / "dense", tmp_path / "converted", "--num-experts", N, "--seed", 3]) == 0
    assert cli.main(["upcycle", tmp_path / "dense", tmp_path / "upcycled", "--num-experts", N, "--seed", 3]) == 0
    for name in ("config.json", "upcycling.json", "model.safetensors"):
        assert (tmp_path / "converted" / name).read_bytes() == (tmp_path / "upcycled" / name).read_bytes()


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def drop_a_tensor(path):
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[-1])
    save_file(tensors, path, metadata={"format": "pt"})


def save_opt(directory):
    AutoModelForCausalLM.from_config(OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               word_embed_proj_dim=HIDDEN)).save_pretrained(directory)


# name: (what is done to the dense directory, extra arguments, what the error says)
REFUSALS = {
    "unknown-architecture": (save_opt, [], "a 'opt' model: supported model types are llama, mistral, qwen2, qwen3, "
                                           "gpt2, bert, roberta"),
    "experts-not-dividing": (None, ["--num-experts", "6"], "intermediate size (64) is not divisible by num_experts "
                                                           "(6)"),
    "no-config": (lambda d: (d / "config.json").unlink(), [], "holds no config.json"),
    "no-such-directory": (lambda d: d.rename(d.with_name("elsewhere")), [], "holds no config.json (no such "
                                                                            "directory)"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), [], "cannot read the weights"),
    "truncated-weights": (lambda d: truncate(d / "model.safetensors"), [], "cannot read the weights"),
    "weights-lacking-a-tensor": (lambda d: drop_a_tensor(d / "model.safetensors"), [], "lack 1 tensors"),
    "k-0": (None, ["--k", "0"], "--k 0 must be between 1 and --num-experts (4)"),
    "k-over-n": (None, ["--k", "5"], "--k 5 must be between 1 and --num-experts (4)"),
    "out-exists": (None, [], "exists: smoe upcycle never overwrites"),
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_refusal_exits_2_and_writes_nothing(refusal, tmp_path, capsys):
    damage, extra, message = REFUSALS[refusal]
    dense_dir, outputs = tmp_path / "dense", tmp_path / "outputs"
    save_dense(CONFIGS["llama"](), dense_dir)
    if damage:
        damage(dense_dir)
    outputs.mkdir()
    if refusal == "out-exists":
        (outputs / "out").mkdir()
        (outputs / "out" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["upcycle", dense_dir, outputs / "out", "--num-experts", N, *extra]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert [message in line for line in error.splitlines() if line.startswith("smoe: error: ")] == [True]
    if refusal == "out-exists":
        assert [p.name for p in outputs.iterdir()] == ["out"] and (outputs / "out" / "keep.txt").read_text() == "mine"
    else:
        assert list(outputs.iterdir()) == []  # no OUT, no temporary directory


def test_a_model_that_is_not_exact_at_k_equal_n_is_refused_after_writing_and_leaves_nothing(tmp_path, capsys,
                                                                                              monkeypatch):
    """The check runs on the written directory: failing it removes that directory, never renaming it."""
    save_dense(CONFIGS["gpt2"](), tmp_path / "dense", tokenizer=True)
    (tmp_path / "outputs").mkdir()
    monkeypatch.setattr(upcycle_command, "EXACT_TOLERANCE", 0.0)
    assert cli.main(["upcycle", tmp_path / "dense", tmp_path / "outputs" / "out", "--num-experts", N]) == 2
    assert "differs from the dense one" in capsys.readouterr().err
    assert list((tmp_path / "outputs").iterdir()) == []


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("split", [None, "kmeans"])
def test_bert_and_roberta_with_the_default_router_are_exact_at_k_equal_n(family, split, tmp_path):
    """SMoE-Dropout's random-frozen router, flattened as for decoder LMs: the converted masked-LM at k = N is
    the dense one whatever the split (the default, contiguous, keeps expert 0 the first d_ff / N neurons)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, intermediate_size=INTERMEDIATE)
    dense = AutoModelForMaskedLM.from_config(config).eval()
    dense.save_pretrained(tmp_path / "dense")
    assert cli.main(["convert", tmp_path / "dense", tmp_path / "out", "--num-experts", N,
                     *(["--split", split] if split else [])]) == 0
    converted = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert converted.config.method == "smoe-dropout" and converted.config.top_k == N
    assert relative_error(converted, dense) < 1e-4
    expert = moe_layers_of(converted)[0].local_experts[0]
    first_slice = dense.base_model.encoder.layer[0].intermediate.dense.weight[:INTERMEDIATE // N]
    assert torch.equal(expert.fc1.weight, first_slice) == (split is None)


def test_an_upcycled_directory_from_before_the_split_was_recorded_reads_as_contiguous(tmp_path):
    """Such directories were cut into contiguous slices; they load as before, and say so."""
    import json

    dense = save_dense(CONFIGS["llama"](), tmp_path / "dense")
    assert cli.main(["upcycle", tmp_path / "dense", tmp_path / "out", "--num-experts", N, "--split", "contiguous"]) == 0
    record = tmp_path / "out" / "upcycling.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "split"}))
    assert Upcycling.read(tmp_path / "out").split == "contiguous"
    assert relative_error(load_upcycled(tmp_path / "out").eval(), dense) < 1e-4
