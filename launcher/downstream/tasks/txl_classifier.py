"""A pretrained Transformer-XL with the paper's sentence-classification head (SST-2).

The model was pretrained on bytes; here it reads words. The vocabulary comes from the
task's training texts: ``[PAD]``, ``[UNK]``, then every lower-cased whitespace-separated
word, most frequent first. The word embeddings are new (the byte embedding and the LM
output bias are dropped); the pretrained layers and routers are kept. A hash router's
table is indexed by token id, so it is redrawn for the word vocabulary from the
pretraining seeds, and a note says so.

The head reads the last real word of each sentence: ``Linear(d, d) -> tanh -> dropout
-> Linear(d, labels)``. Attention is causal, so right padding never reaches that word.
Each sentence is read on its own, without memory.

Shapes: B sentences, T words, D d_model, L labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from smoe.launcher.checkpoints.consolidate import read_consolidated, save_consolidated
from smoe.launcher.config import TrainConfig
from smoe.launcher.downstream.tasks.base import Classifier
from smoe.launcher.families.transformer_xl import build_model
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic
from smoe.model import top_k_of
from smoe.routing.routers import HashRouter

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
VOCABULARY_FILE = "vocab.txt"
HEAD_DROPOUT = 0.1


def build_vocabulary(texts: list[str]) -> list[str]:
    """``[PAD]``, ``[UNK]``, then each lower-cased whitespace word of ``texts``, most frequent
    first (ties alphabetical), so the same texts always give the same ids."""
    counts = Counter(word for text in texts for word in text.lower().split())
    return [PAD, UNK, *sorted(counts, key=lambda word: (-counts[word], word))]


class TransformerXLClassifier(Classifier):
    """Transformer-XL body on a word vocabulary, with a classification head."""

    default_lr = 1e-4

    def __init__(self, config: TrainConfig, vocabulary: list[str], num_labels: int, max_length: int):
        """``config`` is the pretrained model's; the body is built for ``vocabulary`` instead of bytes."""
        super().__init__()
        self.config = replace(config, vocab_size=len(vocabulary), ep_size=1)
        self.vocabulary = vocabulary
        self.word_ids = {word: i for i, word in enumerate(vocabulary)}
        self.max_length = max_length
        self.method = config.method
        self.body = build_model(self.config)
        self.body.out_bias = None  # the bias of the LM output layer, which a classifier does not have
        d_model = config.d_model
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh(), nn.Dropout(HEAD_DROPOUT),
                                  nn.Linear(d_model, num_labels))

    @classmethod
    def from_pretrained(cls, model_dir: Path, train_texts: list[str], num_labels: int,
                        max_length: int) -> "TransformerXLClassifier":
        """A classifier on the model in ``model_dir``: `smoe slim` output gets a vocabulary from
        ``train_texts``, new word embeddings and a new head; a directory that :meth:`save`
        wrote (with its vocab.txt) comes back as it was saved."""
        model_file = Path(model_dir) / "model.safetensors"
        config, state, _ = read_consolidated(model_file)
        vocabulary_file = Path(model_dir) / VOCABULARY_FILE
        if vocabulary_file.is_file():
            model = cls(config, vocabulary_file.read_text().splitlines(), num_labels, max_length)
            model.load_state_dict(state)
            return model
        model = cls(config, build_vocabulary(train_texts), num_labels, max_length)
        model.load_pretrained_body(state, config.vocab_size, model_file)
        return model

    def load_pretrained_body(self, state: dict[str, torch.Tensor], pretrained_vocab_size: int, source: Path) -> None:
        """Every pretrained tensor but those indexed by the pretraining token ids: the byte
        embedding, the LM output bias and the hash routers' tables (redrawn, with a note)."""
        hash_tables = [f"{name}.table" for name, module in self.body.named_modules() if isinstance(module, HashRouter)]
        token_indexed = {"word_emb.weight", "out_bias", *hash_tables}
        missing, unexpected = self.body.load_state_dict(
            {name: tensor for name, tensor in state.items() if name not in token_indexed}, strict=False)
        not_loaded = sorted(set(missing) - token_indexed)
        if unexpected or not_loaded:
            raise ValueError(f"{source} does not fit its own config (missing {not_loaded[:3]}, "
                             f"unexpected {unexpected[:3]}): pass a file written by `smoe slim` or "
                             "`smoe ckpt consolidate`")
        if hash_tables:
            log.note(f"the hash router's table maps the {pretrained_vocab_size} pretraining token ids (bytes) to "
                     f"experts; it is redrawn for the {len(self.vocabulary):,}-word vocabulary from the pretraining "
                     "seeds, so words are routed at random, not as the pretrained bytes were")

    def new_parameters(self) -> list[nn.Parameter]:
        """The head and the word embeddings are trained from scratch."""
        return [*self.head.parameters(), self.body.word_emb.weight]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids (B, T), right-padded and cut to max_length, and each sentence's length
        (an empty sentence reads as one [UNK])."""
        rows = [[self.word_ids.get(word, UNK_ID) for word in text.lower().split()][:self.max_length] or [UNK_ID]
                for text in texts]
        lengths_B = torch.tensor([len(row) for row in rows])
        ids_BT = torch.full((len(rows), int(lengths_B.max())), PAD_ID)
        for i, row in enumerate(rows):
            ids_BT[i, :len(row)] = torch.tensor(row)
        return ids_BT.to(self.device), lengths_B.to(self.device)

    def outputs(self, batch: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids_BT, lengths_B = self.encode([text for text, _ in batch])
        out = self.body.hidden_states(ids_BT)
        last_BD = out.hidden[torch.arange(len(batch), device=ids_BT.device), lengths_B - 1]
        logits_BL = self.head(last_BD)
        return logits_BL, out.aux_loss

    def labels(self, batch: list[tuple[str, int]]) -> torch.Tensor:
        return torch.tensor([label for _, label in batch], device=self.device)

    def save(self, out: Path) -> None:
        """model.safetensors (with the word-level config, at the k it was fine-tuned at, in its
        metadata) and vocab.txt, which :meth:`from_pretrained` reloads."""
        k = top_k_of(self)
        config = self.config if k is None else replace(self.config, k_min=k, k_max=k, k_fixed=k)
        out.mkdir(parents=True, exist_ok=True)
        save_consolidated(self, config, out / "model.safetensors")
        write_atomic(out / VOCABULARY_FILE, "\n".join(self.vocabulary) + "\n")
