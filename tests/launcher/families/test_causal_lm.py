"""`smoe train --init` for causal LMs: an upcycled Llama trains on the engine with the k schedule,
resumes exactly, runs on two expert-parallel ranks as on one, evaluates at every k; the dense
baseline and a Llama from scratch train too; and what cannot work is refused before anything runs."""

from __future__ import annotations

import json

import pytest
import torch

from smoe.launcher.runtime.distributed import free_port

from runs import BOOKS_VOCAB, card_code, run, scalars, smoe

VOCAB = BOOKS_VOCAB
CAUSAL = ["block_size=16", "batch_size=8", "eval_batch_size=4", "log_every=1", "eval_every=100", "save_every=100",
          "eval_segments=2", "warmup_steps=2", "max_steps=8", "dispatch=sorted"]


def train(books, out, *args, check=True):
    return smoe("train", "--data-files", books, "--out", out, *CAUSAL, *args, check=check)


def test_an_upcycled_llama_trains_resumes_exactly_and_evaluates_at_every_k(books, llama_dirs, tmp_path,
                                                                           monkeypatch):
    straight = tmp_path / "straight"
    result = train(books, straight, "--init", llama_dirs / "upcycled")
    assert "training smoe-dropout (causal-lm)" in result.stdout
    config = json.loads((straight / "config.json").read_text())
    assert (config["num_experts"], config["k_max"], config["d_model"], config["vocab_size"]) == (4, 4, 32, VOCAB)
    assert (straight / "model" / "upcycling.json").is_file() and (straight / "model" / "config.json").is_file()
    train(books, tmp_path / "split", "--init", llama_dirs / "upcycled", "--stop-at", "4")
    train(books, tmp_path / "split", "--resume")
    losses = scalars(straight, "train/loss")
    assert sorted(losses) == list(range(1, 9))
    assert scalars(tmp_path / "split", "train/loss") == pytest.approx(losses, abs=1e-6)
    ks = [scalars(straight, "moe/top_k")[step] for step in range(1, 9)]
    assert ks[0] == 1 and ks[-1] == 4 and ks == sorted(ks)  # k grows from k_min 1 to the directory's N
    perplexity = scalars(straight, "train/perplexity")
    assert perplexity[8] == pytest.approx(torch.tensor(losses[8]).exp().item(), rel=1e-4)
    pruned = json.loads((straight / "pruned.json").read_text())  # before the first step: k < N costs
    assert [row["k"] for row in pruned["rows"]] == [1, 2, 4] and pruned["step"] == 0
    assert len({row["valid_bpc"] for row in pruned["rows"]}) == 3  # each k its own model
    report = json.loads((straight / "eval.json").read_text())
    assert report["unit"] == "bits/token" and [row["k"] for row in report["rows"]] == [1, 2, 4]
    assert all(row["test_perplexity"] == pytest.approx(2 ** row["test_bpc"]) for row in report["rows"])
    smoe("eval", straight, "--json", tmp_path / "eval.json", "--k", "1,2,4,1/4")  # and a per-layer slice
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    for row, expected in zip(rows, report["rows"]):
        assert row["valid_bpc"] == pytest.approx(expected["valid_bpc"], abs=1e-5)
    assert rows[3]["k"] == [1, 4] and rows[0]["active_params"] < rows[3]["active_params"] < rows[2]["active_params"]
    assert rows[0]["flops_per_token"] < rows[3]["flops_per_token"] < rows[2]["flops_per_token"]
    budget = (rows[0]["flops_per_token"] + rows[2]["flops_per_token"]) / 2e9
    smoe("slice", straight, "--budget-gflops", f"{budget:.6g}", "--ks", "1,2,4", "--max-batches", "1",
         "--repeats", "1", "--name", "small")
    smoe("export", straight, tmp_path / "native")  # the trained run as transformers' own MoE class
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native", num_experts_per_tok=2)
    assert type(native).__name__ == "MixtralForCausalLM" and native.config.num_experts_per_tok == 2
    assert native.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    # The slice, checked against smoe by the export, loads with the card's loop over the layers' routers.
    small, = json.loads((tmp_path / "native" / "slices.json").read_text())["slices"]
    card = (tmp_path / "native" / "README.md").read_text()
    assert "trust_remote_code" not in card_code(card) and "| small |" in card
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(card_code(card), scope)
    routers = [layer.mlp.gate.top_k for layer in scope["model"].model.layers]
    assert scope["ks"] == small["ks"] == routers and small["flops_per_token"] <= budget * 1e9
    smoe("bench", "infer", tmp_path / "native", "--slice", "small", "--ks", "4", "--batch", "1", "--length", "8",
         "--repeats", "1", "--json", tmp_path / "timed.json")  # the native class, timed at the slice
    timed = json.loads((tmp_path / "timed.json").read_text())["rows"]
    assert [row["k"] for row in timed] == [4, small["ks"]] and all(row["latency_ms"] > 0 for row in timed)


def test_the_first_step_starts_from_the_upcycled_weights(books, llama_dirs, tmp_path):
    """At k = N the upcycled model is the dense one: the first step's loss is the dense baseline's."""
    upcycled = train(books, tmp_path / "moe", "--init", llama_dirs / "upcycled", "k_min=4", "max_steps=1")
    dense = train(books, tmp_path / "dense", "--init", llama_dirs / "dense", "--method", "dense", "max_steps=1")
    assert "training dense (causal-lm)" in dense.stdout and upcycled.returncode == 0
    assert scalars(tmp_path / "moe", "train/loss")[1] == pytest.approx(scalars(tmp_path / "dense", "train/loss")[1],
                                                                       rel=1e-5)


def test_two_expert_parallel_ranks_train_as_one(books, llama_dirs, tmp_path):
    """The same two data-parallel ranks with ep_size 2 and 1: the losses of every step agree, so the
    forward and the gradients (which make the later steps' losses) do."""
    def ranks(out, ep_size):
        return run(["deepspeed", "--num_gpus", 2, "--master_port", free_port(), "--module", "smoe.launcher.cli",
                    "train", "--init", llama_dirs / "upcycled", "--data-files", books, "--out", out, *CAUSAL,
                    "max_steps=4", "k_min=2", f"ep_size={ep_size}"])

    assert "2 rank(s), ep_size 2" in ranks(tmp_path / "ep2", 2).stdout
    ranks(tmp_path / "ep1", 1)
    assert scalars(tmp_path / "ep2", "train/loss") == pytest.approx(scalars(tmp_path / "ep1", "train/loss"), rel=1e-5)
    assert len(list((tmp_path / "ep2" / "checkpoints" / "step000004").glob("layer_*_expert_*"))) == 2 * 4


def test_a_llama_trains_from_scratch_with_a_tokenizer_trained_on_the_text(books, tmp_path):
    result = smoe("train", "--preset", "llama-tiny", "--method", "dense", "--data-files", books, "--out", tmp_path / "run",
                  *CAUSAL, "n_layer=2", "d_model=32", "d_ff=64", f"vocab_size={VOCAB}", "max_positions=16")
    assert "training dense (llama-tiny)" in result.stdout
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model_type"] == "llama"
    smoe("export", tmp_path / "run", tmp_path / "hf")  # dense: its own class, the study's way to `smoe upcycle`
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--init", "{dense}", "--method", "smoe-dropout"], "is a dense model: train it with --method dense"),
    (["--init", "{upcycled}", "--method", "smoe-learned"], "was upcycled for method smoe-dropout"),
    (["--init", "{upcycled}", "d_model=64"], "d_model=64: the --init directory fixes it"),
    (["--init", "{upcycled}", "--method", "dense-concrete"], "upcycled for method smoe-dropout"),
    (["--init", "{missing}"], "holds no config.json"),
    (["--preset", "causal-lm"], "takes its model from --init"),
    (["--preset", "tiny", "--init", "{upcycled}"], "preset tiny trains another model"),
])
def test_what_cannot_train_is_refused_before_anything_is_written(books, llama_dirs, tmp_path, capsys, args, message):
    """In this process: each is refused while the config is built, before any process group."""
    from smoe.launcher.cli import main

    paths = {"dense": llama_dirs / "dense", "upcycled": llama_dirs / "upcycled", "missing": tmp_path / "none"}
    argv = ["train", "--data-files", books, "--out", tmp_path / "run", *CAUSAL, *[a.format(**paths) for a in args]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bf16_training_of_an_upcycled_llama_follows_fp32(books, llama_dirs, tmp_path):
    """In a bf16 engine the first step (k = N: the dense model) gives fp32's loss to bf16 rounding, and
    the frozen routers stay fp32 (the checkpoint holds them as they were upcycled)."""
    from safetensors.torch import load_file

    (tmp_path / "bf16.json").write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    common = ["--init", llama_dirs / "upcycled", "k_min=4", "max_steps=2"]
    train(books, tmp_path / "bf16", *common, f"ds_config={tmp_path / 'bf16.json'}")
    train(books, tmp_path / "fp32", *common)
    bf16, fp32 = scalars(tmp_path / "bf16", "train/loss"), scalars(tmp_path / "fp32", "train/loss")
    assert bf16[1] == pytest.approx(fp32[1], rel=2e-2) and bf16[1] != fp32[1]
    smoe("ckpt", "consolidate", tmp_path / "bf16", tmp_path / "bf16.safetensors")
    saved = load_file(str(llama_dirs / "upcycled" / "model.safetensors"))
    routers = {name: t for name, t in load_file(str(tmp_path / "bf16.safetensors")).items() if ".gate.proj." in name}
    assert routers and all(t.dtype == torch.float32 and torch.equal(t, saved[name]) for name, t in routers.items())
