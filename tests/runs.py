"""Helpers for end-to-end tests: a small model's overrides, `smoe` in a subprocess, events read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from smoe.launcher.bench.runs import scalars
from smoe.launcher.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]  # the repository: the package's root

# The small Transformer-XL of the end-to-end tests. One fixed dispatch: `auto` is timed when a run
# starts, and two fresh runs that time differently differ in float rounding (a resume never does).
SMALL = ["n_layer=2", "d_model=32", "n_head=2", "d_head=16", "d_ff=64", "num_experts=4", "tgt_len=16",
         "mem_len=16", "eval_tgt_len=16", "batch_size=4", "eval_batch_size=4", "k_min=1", "k_max=4", "k_fixed=2",
         "eval_ks=1,2,4", "log_every=1", "eval_every=10", "eval_segments=2", "save_every=10", "warmup_steps=2",
         "dispatch=sorted"]
# The small BERT/RoBERTa of the masked-LM tests (its shape, data and evaluation batch; a test adds its batch).
SMALL_MLM = ["n_layer=2", "d_model=32", "n_head=2", "d_ff=64", "num_experts=4", "k_min=1", "k_max=4", "k_fixed=2",
             "vocab_size=300", "block_size=16", "max_positions=32", "eval_batch_size=4", "dispatch=sorted"]

# The words of the `books` and `sst2` fixtures' text, and the BERT run the downstream tests share (4 steps on books).
WORDS = "the quick brown fox jumps over a lazy dog while seven old wizards quietly brew potions".split()
MLM = [*SMALL_MLM, "batch_size=8", "eval_ks=4", "log_every=1", "eval_every=100", "save_every=100", "eval_segments=1",
       "max_steps=4"]

CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

# The tiny random-weight decoder LMs of the upcycling and export tests: every architecture upcycling takes.
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
DECODER_VOCAB, DECODER_HIDDEN, DECODER_INTERMEDIATE = 101, 32, 64
BOOKS_VOCAB = 300  # the causal-LM tests' tiny Llama: a tokenizer trained on the `books` fixture


def decoder_config(architecture: str, layers: int = 3, **extra):
    """A transformers config of ``architecture`` at the tests' tiny size, ``extra`` fields on top."""
    from transformers import CONFIG_MAPPING

    if architecture == "gpt2":
        fields = dict(n_embd=DECODER_HIDDEN, n_inner=DECODER_INTERMEDIATE, n_layer=layers, n_head=4, n_positions=64,
                      bos_token_id=1, eos_token_id=2)
    else:
        fields = dict(hidden_size=DECODER_HIDDEN, intermediate_size=DECODER_INTERMEDIATE, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      **({"head_dim": 8} if architecture == "qwen3" else {}))
    return CONFIG_MAPPING[architecture](**{"vocab_size": DECODER_VOCAB, **fields, **extra})


def run(command: list, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, command)), env={**os.environ, **CPU_ENV}, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def smoe(*args, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "smoe.launcher.cli", *args], check=check)


# Dropout off: runs on different layouts must then agree to float rounding.
DETERMINISTIC = [*SMALL, "max_steps=8", "dropout=0", "save_every=100", "eval_every=100"]


def train(out, corpus, *args, ranks: int = 1) -> subprocess.CompletedProcess:
    """`smoe train` of the small deterministic model, on one process or `ranks` started by DeepSpeed's launcher."""
    command = ["train", "--out", out, "--data-file", corpus, *DETERMINISTIC, *args]
    if ranks == 1:
        return smoe(*command)
    return run(["deepspeed", "--num_gpus", ranks, "--master_port", free_port(), "--module", "smoe.launcher.cli",
                *command])


__all__ = ["BOOKS_VOCAB", "CPU_ENV", "DECODERS", "DECODER_HIDDEN", "DECODER_INTERMEDIATE", "DECODER_VOCAB",
           "DETERMINISTIC", "MLM", "REPO", "SMALL", "SMALL_MLM", "WORDS", "decoder_config", "run", "scalars", "smoe",
           "train"]


def card_code(card: str) -> str:
    """The python block of a model card's slices section."""
    section = card[card.index("## Slices"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```", start)]
