"""What the decoder-LM export tests share: tiny random-weight dense models of every architecture
upcycle takes, a tokenizer of their vocabulary, what smoe gives at every k, and the run in the bare
environment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from smoe.launcher.export.verify import padded_ids
from smoe.model.decoder import upcycle
from smoe.model.moe import moe_layers_of, set_top_k

from runs import DECODER_HIDDEN, DECODER_INTERMEDIATE, DECODER_VOCAB, DECODERS, decoder_config

HERE = Path(__file__).parent
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, EXPERTS = DECODER_VOCAB, DECODER_HIDDEN, DECODER_INTERMEDIATE, 3, 4
CONFIGS = {architecture: (lambda a=architecture, **extra: decoder_config(a, LAYERS, **extra))
           for architecture in DECODERS}
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
    """smoe's logits at every k and at a slice (k = 1 and N in turn over the MoE layers), and its greedy
    continuation of a prompt."""
    inputs = padded_ids(VOCAB, (2, 16))
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    logits, generated = {}, {}
    for k in range(1, EXPERTS + 1):
        set_top_k(model, k)
        logits[k] = model(**inputs).logits
        generated[k] = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    ks = [(1, EXPERTS)[i % 2] for i in range(len(moe_layers_of(model)))]
    set_top_k(model, ks)
    sliced = {"ks": ks, "logits": model(**inputs).logits}
    return {"inputs": inputs, "logits": logits, "slice": sliced, "prompt": prompt, "new_tokens": 5,
            "generated": generated}


def bare_results(bare_python: Path, cases: Path) -> dict:
    """bare_check.py's report on the cases of the JSON file ``cases``, checked to have run without smoe,
    DeepSpeed and datasets."""
    result = subprocess.run([str(bare_python), "-I", str(HERE / "bare_check.py"), str(cases)], capture_output=True,
                            stdin=subprocess.DEVNULL, text=True, timeout=900)  # never waits on a prompt
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["importable"] == {"smoe": False, "deepspeed": False, "datasets": False}
    return report["cases"]


def export_cases(root: Path, cases: dict, export_in_memory, fields: dict) -> Path:
    """Each case (name -> (architecture, upcycle's keywords, config extras, through the CLI from an
    upcycled directory with a tokenizer)) exported, by `smoe export UPCYCLED_DIR` or by
    ``export_in_memory(model, out, top_k)``, with what smoe gives at every k; ``root/cases.json``
    lists them (with ``fields``) for :func:`bare_results`."""
    from smoe.launcher.cli import main
    from smoe.model.decoder import Upcycling, save_upcycled

    listed = {}
    for name, (architecture, upcycling, extra, from_directory) in cases.items():
        model = upcycled(architecture, upcycling, **extra)
        out = root / name
        if from_directory:
            source = root / f"{name}-upcycled"
            save_upcycled(model, Upcycling(EXPERTS, **upcycling), source)
            save_tokenizer(source)
            assert main(["export", str(source), str(out)]) == 0
        else:
            export_in_memory(model, out, upcycling.get("top_k"))
        torch.save(expected(model), root / f"{name}.pt")
        listed[name] = {"dir": str(out), "expected": str(root / f"{name}.pt"), **fields,
                        **({"text": TEXT} if from_directory else {})}
    (root / "cases.json").write_text(json.dumps(listed))
    return root
