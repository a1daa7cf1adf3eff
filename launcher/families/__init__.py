"""The model families a run can be: Transformer-XL on bytes; BERT or RoBERTa masked-LM; a causal LM
(Llama, Mistral, Qwen, GPT-2) on text.

A family is one object that knows, for its runs, the model (built from the run's config),
the data (streams, micro-batches and the forward pass the loop calls), the evaluation (the
loss on a split, FLOPs per token), and how a run is read back (examples as token ids, the
experts its layers pick, what a consolidated file records). The loop, `smoe eval`, `smoe
slim` and `smoe ckpt consolidate` all take the family :func:`family_of` gives them and never
ask which one it is. The interface is :class:`~.base.Family`; a new family is a new module
here that provides it, and one line in :func:`family_of`.
"""

from __future__ import annotations

from pathlib import Path

from smoe.launcher.config import TrainConfig
from smoe.launcher.families.base import Family, Pass
from smoe.launcher.families.transformer_xl import TransformerXLFamily


def family_of(config: TrainConfig, run_root: Path | None = None, metadata: dict[str, str] | None = None) -> Family:
    """The family of a run (its directory) or of a consolidated file (its metadata). The text families
    (transformers, tokenizers) are imported only for a run on text."""
    if not config.text:
        return TransformerXLFamily(config)
    if config.masked_lm:
        from smoe.launcher.families.masked_lm import MaskedLMFamily as family
    else:
        from smoe.launcher.families.causal_lm import CausalLMFamily as family

    if metadata is not None:
        if "pad_token_id" not in metadata:
            raise ValueError(f"this consolidated {config.model} file records no pad_token_id: consolidate the run "
                             "again with `smoe ckpt consolidate RUN OUT`")
        return family(config, pad_token_id=int(metadata["pad_token_id"]))
    return family(config, run_root)


__all__ = ["Family", "Pass", "TransformerXLFamily", "family_of"]
