"""Transformer-XL on a byte corpus (enwik8, or any file split 90/5/5): one token per byte,
bits per character, memory carried from segment to segment."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from smoe.data import OrderedStream, check_fits, load_corpus
from smoe.launcher.config import TrainConfig
from smoe.launcher.evaluation.metrics import evaluate, flops_per_token, segment_forward
from smoe.launcher.families.base import Pass
from smoe.model.feedforward import feedforward_factory
from smoe.model.parallel import init_expert_parallel
from smoe.model.transformer_xl import TransformerXL, lm_loss


def build_model(config: TrainConfig, rank: int = 0) -> TransformerXL:
    ep_rank = init_expert_parallel(config.ep_size)
    return TransformerXL(config.model_config(), feedforward_factory(config.feedforward_spec(), ep_rank, rank))


class TransformerXLFamily:
    """What training, evaluation and the commands that read a run back need of a Transformer-XL run."""

    name = "transformer-xl"
    unit = "BPC"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.max_length = config.mem_len + config.tgt_len  # the context it was trained with
        self.splits = None

    # --- the model ---------------------------------------------------------------------------
    def build(self, config: TrainConfig | None = None, rank: int = 0) -> nn.Module:
        return build_model(config or self.config, rank)

    def metadata(self) -> dict[str, str]:
        """What a consolidated file needs besides the config to build the model again."""
        return {}

    def save_with_run(self, run_root) -> None:
        """Nothing besides the config is needed to read the run back."""

    def initialize(self, model: nn.Module) -> None:
        """A run starts from the model's own seeded initialisation."""

    # --- examples for `smoe slim` ------------------------------------------------------------
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The bytes of each example (UTF-8, as enwik8), at most the trained context."""
        return [list(text.encode("utf-8")[:self.max_length]) for text in texts]

    def expert_counts(self, model: nn.Module, ids_BT: torch.Tensor) -> list[torch.Tensor]:
        return model(ids_BT).expert_counts

    # --- data --------------------------------------------------------------------------------
    def load_data(self, data_dir: str | None = None, data_file: str | None = None) -> None:
        """The run's corpus (or another one), refused when a split is too short for one batch."""
        config = self.config
        self.splits = load_corpus(data_dir or config.data_dir or None, data_file or config.data_file or None)
        for split, tokens, batch, seq in (("train", self.splits.train, config.batch_size, config.tgt_len),
                                          ("valid", self.splits.valid, config.eval_batch_size, config.eval_tgt_len),
                                          ("test", self.splits.test, config.eval_batch_size, config.eval_tgt_len)):
            check_fits(len(tokens), batch, seq, split)

    @property
    def source(self) -> str:
        return self.splits.source

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.tgt_len

    # --- training ----------------------------------------------------------------------------
    def train_stream(self, rank: int, world: int) -> OrderedStream:
        return OrderedStream(self.splits.train, self.config.batch_size, self.config.tgt_len, rank, world)

    def micro_batches(self, stream: OrderedStream, memory: list | None):
        """The next segment, this rank's rows cut into ``grad_accum`` micro-batches, each with its rows'
        memory (none when the data wrapped round)."""
        segment = stream.next_segment()
        accum = self.config.grad_accum
        if memory is None or segment.new_epoch:
            memory_of = [None] * accum
        else:
            memory_of = list(zip(*(m.chunk(accum) for m in memory)))
        return zip(zip(segment.inputs.chunk(accum), segment.targets.chunk(accum)), memory_of)

    def forward(self, engine, micro_batch, memory, device) -> tuple[Pass, list]:
        inputs, targets = (t.to(device, non_blocking=True) for t in micro_batch)
        out = engine(inputs, memory)
        return Pass(lm_loss(out.logits, targets), out.aux_loss, out.expert_counts, out.logits), out.mems

    def carry(self, memories: list) -> list[torch.Tensor]:
        """The micro-batches' memory rows joined again: what the next step starts from."""
        return [torch.cat(layer, dim=0) for layer in zip(*memories)]

    # --- evaluation --------------------------------------------------------------------------
    def eval_loss(self, model: nn.Module, split: str, rank: int, world: int, device, max_batches: int = 0) -> float:
        tokens = {"valid": self.splits.valid, "test": self.splits.test}[split]
        config = self.config
        stream = OrderedStream(tokens, config.eval_batch_size, config.eval_tgt_len, rank, world, name=split)
        return evaluate(model, stream, config.eval_mem_len, max_batches)

    def flops_per_token(self, model: nn.Module, device) -> float:
        config = self.config
        return flops_per_token(model, config.eval_tgt_len, config.eval_mem_len, config.vocab_size)

    def example_forward(self, model: nn.Module, device) -> Callable[[], object]:
        config = self.config
        return segment_forward(model, config.eval_tgt_len, config.eval_mem_len, config.vocab_size)
