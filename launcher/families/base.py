"""What a family is to the loop and to the commands: the one interface every family provides."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Protocol

import torch
from torch import nn

from smoe.launcher.config import TrainConfig


class Pass(NamedTuple):
    """One forward pass over a micro-batch, as the loss needs it."""

    ce: torch.Tensor
    aux: torch.Tensor  # the layers' auxiliary losses
    counts: list  # per layer: tokens per expert (None for a dense layer)
    logits: torch.Tensor  # for THOR's consistency term
    scored: torch.Tensor | None = None  # where the loss is read (masked-LM's masked tokens); None: everywhere


class Family(Protocol):
    """A model family (Transformer-XL, BERT/RoBERTa, causal LMs): its model, data, evaluation and read-back.

    ``memory`` is what crosses steps (Transformer-XL's memory rows; None for masked-LM): the
    loop keeps it, saves it in each rank's checkpoint file and hands it back."""

    name: str  # config.model
    unit: str  # what the sweep reports: "BPC", "bits/token"
    max_length: int  # the longest example `smoe slim` feeds it

    # the model
    def build(self, config: TrainConfig | None = None, rank: int = 0) -> nn.Module: ...
    def metadata(self) -> dict[str, str]: ...  # recorded in a consolidated file, to build it again
    def save_with_run(self, run_root: Path) -> None: ...  # what besides config.json reads the run back
    def initialize(self, model: nn.Module) -> None: ...  # the weights a new run starts from (causal-LM: --init's)
    # examples for `smoe slim`
    def token_ids(self, texts: list[str]) -> list[list[int]]: ...
    def expert_counts(self, model: nn.Module, ids_BT: torch.Tensor) -> list[torch.Tensor]: ...
    # data
    def load_data(self, data_dir: str | None = None, data_file: str | None = None) -> None: ...
    source: str
    tokens_per_step: int
    # training
    def train_stream(self, rank: int, world: int): ...
    def micro_batches(self, stream, memory) -> Iterable[tuple[object, object]]: ...
    def forward(self, engine, micro_batch, memory, device) -> tuple[Pass, object]: ...
    def carry(self, memories: list): ...
    # evaluation
    def eval_loss(self, model: nn.Module, split: str, rank: int, world: int, device, max_batches: int = 0) -> float: ...
    def flops_per_token(self, model: nn.Module, device) -> float: ...
    def example_forward(self, model: nn.Module, device) -> Callable[[], object]: ...  # batch 1, for latency
