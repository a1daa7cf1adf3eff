"""What a downstream task is to `smoe finetune`: its data splits and a model with its head.

A :class:`Task` reads its data into splits (one train/dev pair, or K folds for
cross-validation) and builds a fresh :class:`TaskModel` for each split from a pretrained
model directory. A ``TaskModel`` takes a batch of the task's raw examples, tokenizes
them itself and returns the training loss, so the fine-tuning loop
(:func:`smoe.launcher.downstream.finetune.fine_tune`) is the same for every task and model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from smoe.launcher.runtime import log


@dataclass
class Split:
    name: str  # "dev", or "fold0".. for cross-validation
    train: list
    dev: list


class TaskModel(nn.Module):
    """A pretrained body with a task head, fed lists of raw examples."""

    default_lr = 2e-5  # BERT/RoBERTa; Transformer-XL bodies use 1e-4
    method: str  # the pretrained model's feed-forward method, for the reports

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, batch: list) -> torch.Tensor:
        """The training loss of ``batch``, the routers' auxiliary losses included."""
        raise NotImplementedError

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters trained from scratch, which ``--head-lr`` applies to (an equation decoder)."""
        return []

    @torch.no_grad()
    def evaluate(self, examples: list) -> dict[str, float]:
        """The task's metrics on ``examples``; the first is the headline one."""
        raise NotImplementedError

    def save(self, out: Path) -> None:
        raise NotImplementedError


class Classifier(TaskModel):
    """A task model whose head scores classes (or choices): cross-entropy, accuracy.

    Subclasses give :meth:`outputs` (logits and the routers' auxiliary loss) and
    :meth:`labels`; distillation (`smoe distill`) uses the same two."""

    def outputs(self, batch: list) -> tuple[torch.Tensor, torch.Tensor | float]:
        raise NotImplementedError

    def labels(self, batch: list) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: list) -> torch.Tensor:
        logits, aux_loss = self.outputs(batch)
        return F.cross_entropy(logits.float(), self.labels(batch)) + aux_loss

    @torch.no_grad()
    def evaluate(self, examples: list, batch_size: int = 64) -> dict[str, float]:
        was_training = self.training
        self.eval()
        correct = 0
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            correct += int((self.outputs(batch)[0].argmax(dim=-1) == self.labels(batch)).sum())
        self.train(was_training)
        return {"accuracy": correct / len(examples)}


class Task:
    """A downstream task: ``name`` on the command line, ``metric`` in the reports."""

    name: str
    metric = "accuracy"
    families = ("bert", "roberta")  # pretrained model families it takes

    def splits(self, data_dir: str | None) -> list[Split]:
        raise NotImplementedError

    def build(self, model_dir: Path, split: Split, max_length: int) -> TaskModel:
        """A fresh model for ``split``: the pretrained body from ``model_dir`` and a new head."""
        raise NotImplementedError


def model_family(model_dir: Path) -> str:
    """"bert" or "roberta" (a transformers directory of ours), or "transformer-xl" (a
    directory holding only ``model.safetensors``, as `smoe slim` writes for a Transformer-XL run)."""
    import json

    config_file = model_dir / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if "num_experts" not in config:
            raise ValueError(f"--model {model_dir} is a plain '{config.get('model_type')}' model: make it ours with "
                             "`smoe convert` first")
        return config["model_type"].removeprefix("smoe-")
    if (model_dir / "model.safetensors").is_file():
        return "transformer-xl"
    raise FileNotFoundError(f"--model {model_dir} holds neither config.json nor model.safetensors: pass `smoe slim` "
                            "or `smoe convert` output")


def max_length_of(config, max_length: int) -> int:
    """``max_length`` cut to the positions a BERT/RoBERTa config has (RoBERTa's start after the padding id)."""
    positions = config.max_position_embeddings - (config.pad_token_id + 1 if config.model_type == "smoe-roberta"
                                                  else 0)
    if max_length > positions:
        log.note(f"--max-length {max_length} cut to the model's {positions} positions")
    return min(max_length, positions)


class TransformersBody(TaskModel):
    """A task model around one of our transformers models (any head) and its tokenizer."""

    def __init__(self, auto_class: str, model_dir: Path, max_length: int, **options):
        super().__init__()
        import transformers

        import smoe.model.bert  # noqa: F401  (registers our configs with the Auto classes)

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = getattr(transformers, auto_class).from_pretrained(model_dir, **options)
        self.max_length = max_length_of(self.model.config, max_length)
        self.method = self.model.config.method

    def aux_loss(self) -> torch.Tensor | float:
        from smoe.model.encoder import aux_loss

        return aux_loss(self.model)

    def save(self, out: Path) -> None:
        """The model at the k it was fine-tuned at (``top_k`` in config.json), and its tokenizer."""
        from smoe.model import top_k_of

        k = top_k_of(self.model)
        if k is not None:
            self.model.config.top_k = k
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
