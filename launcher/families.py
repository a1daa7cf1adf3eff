"""The model families a run can be (Transformer-XL on bytes; BERT or RoBERTa masked-LM), and
what the commands that read a run back need of each: its model built from the run's config,
its examples as token ids, the experts its layers picked. Chosen once, by :func:`family_of`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .build import build_model
from .config import TrainConfig


class TransformerXLFamily:
    """Transformer-XL runs: the bytes of each example (UTF-8, as enwik8), at most the context
    it was trained with (mem_len + tgt_len)."""

    name = "transformer-xl"

    def __init__(self, config: TrainConfig):
        self.max_length = config.mem_len + config.tgt_len

    def build(self, config: TrainConfig, rank: int = 0) -> nn.Module:
        return build_model(config, rank)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")[:self.max_length]) for text in texts]

    def expert_counts(self, model: nn.Module, ids_BT: torch.Tensor) -> list[torch.Tensor]:
        return model(ids_BT).expert_counts

    def metadata(self) -> dict[str, str]:
        """What a consolidated file needs besides the config to build the model again."""
        return {}


class MaskedLMFamily:
    """BERT/RoBERTa runs: the run's tokenizer (or only its padding id, for a consolidated file)."""

    def __init__(self, config: TrainConfig, run_root: Path | None = None, pad_token_id: int | None = None):
        self.name = config.model
        self.max_length = config.block_size
        self.tokenizer = None
        if pad_token_id is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or Path(run_root) / "tokenizer")
            pad_token_id = self.tokenizer.pad_token_id
        self.pad_token_id = pad_token_id

    def build(self, config: TrainConfig, rank: int = 0) -> nn.Module:
        from .masked_lm import build_mlm_model

        return build_mlm_model(config, self.pad_token_id, rank)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def expert_counts(self, model: nn.Module, ids_BT: torch.Tensor) -> list[torch.Tensor]:
        from smoe.model.bert import expert_counts

        model(input_ids=ids_BT)
        return expert_counts(model)

    def metadata(self) -> dict[str, str]:
        return {"pad_token_id": str(self.pad_token_id)}


Family = TransformerXLFamily | MaskedLMFamily


def family_of(config: TrainConfig, run_root: Path | None = None, metadata: dict[str, str] | None = None) -> Family:
    """The family of a run (its directory) or of a consolidated file (its metadata)."""
    if not config.masked_lm:
        return TransformerXLFamily(config)
    if metadata is not None:
        if "pad_token_id" not in metadata:
            raise ValueError("this consolidated masked-LM file records no pad_token_id: consolidate the run again "
                             "with `smoe ckpt consolidate RUN OUT`")
        return MaskedLMFamily(config, pad_token_id=int(metadata["pad_token_id"]))
    return MaskedLMFamily(config, run_root)
