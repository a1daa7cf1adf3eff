"""GLUE SST-2 (binary sentiment): the TSV files GLUE ships, or the hub copy through ``datasets``."""

from __future__ import annotations

import csv
from pathlib import Path

CLASSES = ("0", "1")


def read_split(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) pairs from a GLUE SST-2 TSV, refusing other columns or labels."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the SST-2 directory must hold train.tsv and dev.tsv")
    with open(path, newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not {"sentence", "label"} <= set(rows.fieldnames or []):
            raise ValueError(f"{path} has columns {rows.fieldnames}: SST-2 needs 'sentence' and 'label'")
        examples = []
        for line, row in enumerate(rows, start=2):
            if row["label"] not in CLASSES:
                raise ValueError(f"{path}:{line}: label {row['label']!r} is not one of SST-2's classes 0, 1")
            examples.append((row["sentence"], int(row["label"])))
    if not examples:
        raise ValueError(f"{path} holds no example")
    return examples


def load_sst2(data_dir: str | None) -> dict[str, list[tuple[str, int]]]:
    """{"train", "dev"}: from ``data_dir``'s train.tsv and dev.tsv, or GLUE on the hub."""
    if data_dir:
        return {split: read_split(Path(data_dir) / f"{split}.tsv") for split in ("train", "dev")}
    import datasets

    glue = datasets.load_dataset("glue", "sst2")
    return {split: list(zip(glue[name]["sentence"], glue[name]["label"]))
            for split, name in (("train", "train"), ("dev", "validation"))}
