"""CommonsenseQA: five-way multiple choice with transformers' multiple-choice head, accuracy on dev.

Each choice is encoded with the question as a sentence pair ``[CLS] question [SEP] choice [SEP]``;
the head scores each pair's pooled output and a softmax runs over the five."""

from __future__ import annotations

from pathlib import Path

import torch

from smoe.data.csqa import Question, load_csqa

from smoe.launcher.downstream.tasks.base import Classifier, Split, Task, TransformersBody


class MultipleChoice(TransformersBody, Classifier):
    def __init__(self, model_dir: Path, max_length: int):
        super().__init__("AutoModelForMultipleChoice", model_dir, max_length)

    def outputs(self, batch: list[Question]):
        choices = len(batch[0].choices)
        inputs = self.tokenizer([q.stem for q in batch for _ in q.choices], [c for q in batch for c in q.choices],
                                truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        inputs = {name: tensor.view(len(batch), choices, -1).to(self.device) for name, tensor in inputs.items()}
        return self.model(**inputs).logits, self.aux_loss()

    def labels(self, batch: list[Question]) -> torch.Tensor:
        return torch.tensor([q.answer for q in batch], device=self.device)


class CSQA(Task):
    name = "csqa"

    def splits(self, data_dir: str | None) -> list[Split]:
        data = load_csqa(data_dir)
        return [Split("dev", data["train"], data["dev"])]

    def build(self, model_dir: Path, split: Split, max_length: int) -> Classifier:
        return MultipleChoice(model_dir, max_length)
