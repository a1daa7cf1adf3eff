"""SST-2: binary sentiment, accuracy on dev. BERT/RoBERTa use transformers' classification
heads; a Transformer-XL body gets the paper's head (:mod:`smoe.model.txl_classifier`)."""

from __future__ import annotations

from pathlib import Path

import torch

from smoe.data.sst2 import load_sst2

from smoe.launcher.downstream.tasks.base import Classifier, Split, Task, TransformersBody, model_family


class SequenceClassifier(TransformersBody, Classifier):
    """transformers' sequence-classification head over one of our BERT/RoBERTa encoders."""

    def __init__(self, model_dir: Path, num_labels: int, max_length: int):
        super().__init__("AutoModelForSequenceClassification", model_dir, max_length, num_labels=num_labels)

    def outputs(self, batch: list[tuple[str, int]]):
        inputs = self.tokenizer([text for text, _ in batch], truncation=True, max_length=self.max_length,
                                padding=True, return_tensors="pt").to(self.device)
        return self.model(**inputs).logits, self.aux_loss()

    def labels(self, batch: list[tuple[str, int]]) -> torch.Tensor:
        return torch.tensor([label for _, label in batch], device=self.device)


class SST2(Task):
    name = "sst2"
    families = ("bert", "roberta", "transformer-xl")

    def splits(self, data_dir: str | None) -> list[Split]:
        data = load_sst2(data_dir)
        return [Split("dev", data["train"], data["dev"])]

    def build(self, model_dir: Path, split: Split, max_length: int) -> Classifier:
        if model_family(model_dir) == "transformer-xl":
            from smoe.launcher.downstream.tasks.txl_classifier import TransformerXLClassifier

            return TransformerXLClassifier.from_pretrained(model_dir, [text for text, _ in split.train],
                                                           num_labels=2, max_length=max_length)
        return SequenceClassifier(model_dir, num_labels=2, max_length=max_length)
