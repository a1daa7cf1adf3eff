"""CommonsenseQA: five-way multiple choice, JSON lines as the official release ships them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LABELS = ("A", "B", "C", "D", "E")
FILES = {"train": "train_rand_split.jsonl", "dev": "dev_rand_split.jsonl"}


@dataclass
class Question:
    stem: str
    choices: tuple[str, ...]  # in LABELS order
    answer: int  # index into choices


def read_split(path: Path) -> list[Question]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the CSQA directory must hold {' and '.join(FILES.values())}")
    questions = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
                stem, choices = record["question"]["stem"], record["question"]["choices"]
                answer = record["answerKey"]
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not JSON ({error.msg}): is this a CSQA *_rand_split.jsonl file?")
            except (KeyError, TypeError) as error:
                raise ValueError(f"{where} lacks {error}: CSQA records need 'answerKey' and "
                                 "'question' with 'stem' and 'choices'")
            labels = tuple(choice["label"] for choice in choices)
            if labels != LABELS:
                raise ValueError(f"{where}: choices are labelled {labels}, CSQA's are {LABELS}")
            if answer not in LABELS:
                raise ValueError(f"{where}: answerKey {answer!r} is not one of CSQA's classes {', '.join(LABELS)}")
            questions.append(Question(stem, tuple(choice["text"] for choice in choices), LABELS.index(answer)))
    if not questions:
        raise ValueError(f"{path} holds no question")
    return questions


def load_csqa(data_dir: str | None) -> dict[str, list[Question]]:
    """{"train", "dev"}: from ``data_dir``'s official files, or the hub's ``tau/commonsense_qa``."""
    if data_dir:
        return {split: read_split(Path(data_dir) / name) for split, name in FILES.items()}
    import datasets

    hub = datasets.load_dataset("tau/commonsense_qa")
    return {split: [Question(row["question"], tuple(row["choices"]["text"]), LABELS.index(row["answerKey"]))
                    for row in hub[name]]
            for split, name in (("train", "train"), ("dev", "validation"))}
