"""What the text families share (masked-LM on BERT/RoBERTa, causal-LM on decoder LMs): text ->
tokenizer -> blocks -> batches, evaluation in bits per scored token with the same batches at every
k and on any number of ranks, and the family methods that only read the data and the tokenizer.
Each family module adds its model (``build``) and its batches' collator."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from torch import nn

from smoe.data.lm_stream import rank_share
from smoe.data.mlm import (TOKENIZER_FILES, BlockStream, causal_collator, check_tokenizer_fits, group_into_blocks,
                           load_texts, mlm_collator, train_tokenizer)
from smoe.launcher.config import TrainConfig
from smoe.launcher.evaluation.metrics import sparse_flops
from smoe.launcher.families.base import Pass

SPLITS = {"valid": "validation", "test": "test"}


@contextlib.contextmanager
def seeded_cpu_rng(seed: int):
    """The global CPU generator seeded for the block, then restored. Not ``torch.manual_seed``,
    which also seeds every CUDA generator: on GPUs that would give every rank the same dropout
    masks and reset the training stream at every validation."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def load_tokenizer(config: TrainConfig, saved_dir, texts):
    """The tokenizer named by the config, else the one saved with the run, else a new one
    trained on ``texts`` (saved with the run by rank 0)."""
    import os

    from transformers import AutoTokenizer

    if config.tokenizer:
        # A path (a separator, or a leading "." or "/") must be a local tokenizer directory; a bare name goes to
        # transformers (its cache or the hub), and its failure is said plainly. This project runs offline.
        name = config.tokenizer
        fix = ("pass a transformers tokenizer directory (holding tokenizer.json, tokenizer_config.json or "
               "vocab.txt) as --tokenizer, or leave --tokenizer out to train one on the text")
        local = os.sep in name or "/" in name or name.startswith(".")
        if local:
            path = Path(name)
            if not path.is_dir():
                raise FileNotFoundError(f"tokenizer {name} " + ("is a file" if path.exists() else "does not exist")
                                        + f": {fix}")
            if not any((path / file).is_file() for file in TOKENIZER_FILES):
                raise ValueError(f"tokenizer {name} holds no tokenizer (no {', '.join(TOKENIZER_FILES)}): {fix}")
        try:
            return AutoTokenizer.from_pretrained(name), name
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            what = (": transformers could not load it" if local else
                    " is no local directory, and transformers could not load it as a hub name")
            raise ValueError(f"tokenizer {name}{what} ({reason}): {fix}") from None
    if (saved_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved_dir), str(saved_dir)
    return train_tokenizer(texts, config.model, config.vocab_size), f"trained on the data ({config.vocab_size:,} tokens)"


class TextData:
    """The text of a run as blocks: splits, tokenizer, collator (masking for masked-LM); evaluation on them."""

    def __init__(self, config: TrainConfig, run_dir: Path):
        self.config = config
        texts, self.source = load_texts(list(config.data_files) or None, config.dataset or None,
                                        config.cache_dir or None, encoding=config.text_encoding)
        self.tokenizer, tokenizer_source = load_tokenizer(config, run_dir / "tokenizer", texts["train"]["text"])
        check_tokenizer_fits(self.tokenizer, config.vocab_size, tokenizer_source, masked=config.masked_lm)
        self.blocks = {split: group_into_blocks(texts[split], self.tokenizer, config.block_size)
                       for split in ("train", "validation", "test")}
        self.collate = mlm_collator(self.tokenizer, config.mlm_probability) if config.masked_lm else causal_collator
        for split in ("validation", "test"):
            self.stream(split, config.eval_batch_size)  # refuses a split too small for one batch

    def stream(self, split: str, batch_size: int, rank: int = 0, world: int = 1, shuffle: bool = False,
               seed: int = 0) -> BlockStream:
        return BlockStream(self.blocks[split], batch_size, self.collate, rank, world, seed=seed, shuffle=shuffle,
                           name=split)

    @torch.no_grad()
    def eval_loss(self, model, split: str, rank: int, world: int, device, max_batches: int = 0) -> float:
        """Mean cross-entropy per scored token (nats) over the split: the masked tokens (masked-LM), or
        every token but each block's first, predicted from the ones before it (causal-LM). The same
        batches at every k and on any number of ranks: every rank masks the whole batch from the same
        seed, then evaluates its rows. A rank with no rows (more ranks than ``eval_batch_size``) evaluates
        the batch's first row with no label, so that expert-parallel all-to-alls stay in step."""
        was_training = model.training
        model.eval()
        batch_size = self.config.eval_batch_size
        share = rank_share(batch_size, rank, world)
        stream = self.stream(SPLITS[split], batch_size)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # nats, scored tokens
        with seeded_cpu_rng(self.config.seed):
            for index, batch in enumerate(stream):
                if max_batches and index >= max_batches:
                    break
                if share.start == share.stop:
                    batch = {key: value[:1] for key, value in batch.items()}
                    batch["labels"] = torch.full_like(batch["labels"], -100)
                else:
                    batch = {key: value[share] for key, value in batch.items()}
                labels = batch.pop("labels").to(device)
                logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
                if not self.config.masked_lm:  # token t's logits predict token t + 1
                    logits, labels = logits[:, :-1], labels[:, 1:]
                nats = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
                totals += torch.stack([nats.double(), (labels != -100).sum().double()])
        if world > 1:
            dist.all_reduce(totals)
        model.train(was_training)
        return (totals[0] / totals[1]).item()

    def flops_per_token(self, model, device) -> float:
        """Forward FLOPs per token of one block."""
        return sparse_flops(model, self.example_forward(model, device)) / self.config.block_size

    def example_forward(self, model, device) -> Callable[[], object]:
        """A forward of one random block."""
        ids = torch.randint(len(self.tokenizer), (1, self.config.block_size), device=device)
        return lambda: model(input_ids=ids)


class TextFamily:
    """What training, evaluation and the commands that read a run back need of a run on text, but its
    model: ``build``, ``metadata``, and the layers' auxiliary losses and expert counts after a forward
    (``aux_loss``, ``layer_counts``) are each family's. Read back from a run directory it uses the
    run's tokenizer; from a consolidated file, only the padding id recorded with it."""

    unit = "bits/token"

    def __init__(self, config: TrainConfig, run_root: Path | None = None, pad_token_id: int | None = None):
        self.config, self.run_root = config, None if run_root is None else Path(run_root)
        self.name = config.model
        self.max_length = config.block_size
        self._tokenizer = None
        self._pad_token_id = pad_token_id
        self.data: TextData | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer or self.run_root / "tokenizer")
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self._pad_token_id is None else self._pad_token_id

    # --- the model ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {"pad_token_id": str(self.pad_token_id)}

    def initialize(self, model: nn.Module) -> None:
        """A masked-LM run starts from the model's own initialisation."""

    def save_with_run(self, run_root: Path) -> None:
        """A tokenizer trained on the data is saved with the run (a named one is in the config)."""
        if not self.config.tokenizer:
            self.tokenizer.save_pretrained(Path(run_root) / "tokenizer")

    # --- examples for `smoe slim` ------------------------------------------------------------
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def expert_counts(self, model: nn.Module, ids_BT: torch.Tensor) -> list[torch.Tensor]:
        model(input_ids=ids_BT)
        return self.layer_counts(model)

    # --- data --------------------------------------------------------------------------------
    def load_data(self, data_dir: str | None = None, data_file: str | None = None) -> None:
        """The run's text (or other files: ``data_dir``, ``data_file``), tokenized with the run's tokenizer."""
        config = self.config
        if data_dir or data_file:
            config = replace(config, data_files=tuple(f for f in (data_dir, data_file) if f))
        self.data = TextData(config, self.run_root)
        self._tokenizer = self.data.tokenizer

    @property
    def source(self) -> str:
        return self.data.source

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.block_size

    # --- training ----------------------------------------------------------------------------
    def train_stream(self, rank: int, world: int) -> BlockStream:
        return self.data.stream("train", self.config.batch_size, rank, world, shuffle=True, seed=self.config.seed)

    def micro_batches(self, stream: BlockStream, memory: None):
        """The next batch of this rank's blocks cut into ``grad_accum`` micro-batches; nothing crosses steps."""
        batch = stream.next_batch()
        accum = self.config.grad_accum
        chunks = {key: value.chunk(accum) for key, value in batch.items()}
        return [({key: chunks[key][i] for key in chunks}, None) for i in range(accum)]

    def forward(self, engine, micro_batch: dict[str, torch.Tensor], memory: None, device) -> tuple[Pass, None]:
        inputs = {key: value.to(device, non_blocking=True) for key, value in micro_batch.items()}
        out = engine(**inputs)
        model = engine.module
        scored = inputs["labels"] != -100
        aux = out.loss.new_zeros(()) + self.aux_loss(model)
        return Pass(out.loss, aux, self.layer_counts(model), out.logits, scored), None

    def carry(self, memories: list) -> None:
        return None

    # --- evaluation --------------------------------------------------------------------------
    def eval_loss(self, model: nn.Module, split: str, rank: int, world: int, device, max_batches: int = 0) -> float:
        return self.data.eval_loss(model, split, rank, world, device, max_batches)

    def flops_per_token(self, model: nn.Module, device) -> float:
        return self.data.flops_per_token(model, device)

    def example_forward(self, model: nn.Module, device) -> Callable[[], object]:
        return self.data.example_forward(model, device)
