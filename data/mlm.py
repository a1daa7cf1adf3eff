"""Text data: lines -> a tokenizer -> blocks of ``block_size`` tokens -> batches: 15 % masking
for masked-LM, the blocks themselves as their own labels for a causal LM.

The pieces are the ecosystem's: ``datasets`` loads the text (a hub data set such as
``bookcorpus``, or local files with the ``text`` builder) and caches every mapped step;
``tokenizers`` trains a WordPiece (BERT) or byte-level BPE (RoBERTa) vocabulary when no
tokenizer is given; ``transformers``' ``DataCollatorForLanguageModeling`` masks. Ours is
the glue, the checks that name what is wrong, and :class:`BlockStream`, the resumable
order in which ranks read the blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smoe.data.lm_stream import rank_share

# The files of which one makes a directory a transformers tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
SPLIT_SEED = 1234  # the valid/test lines are the same for every run on the same files
# In id order: padding is 0 for BERT and 1 for RoBERTa, as in their released vocabularies.
SPECIAL_TOKENS = {"bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                           "mask_token": "[MASK]"},
                  "roberta": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                              "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"},
                  # a causal LM trained from scratch: byte-level BPE, each line as <s> line </s>
                  "causal-lm": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}}


def text_files(paths: list[str], encoding: str = "utf-8") -> list[str]:
    """Files named, or every ``*.txt`` in a named directory; missing or undecodable ones are an error."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(str(p) for p in path.glob("*.txt"))
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"--data-files: {path} does not exist: pass text files or a directory of *.txt")
    if not files:
        raise FileNotFoundError(f"--data-files {' '.join(paths)}: no *.txt file there")
    for name in files:
        try:
            Path(name).read_text(encoding=encoding)
        except UnicodeDecodeError as error:
            raise ValueError(f"{name} is not {encoding} text (byte {error.start}: {error.reason}): convert it "
                             f"(iconv -t {encoding}), leave it out, or set text_encoding=latin-1") from None
    return files


def load_texts(data_files: list[str] | None = None, dataset: str | None = None, cache_dir: str | None = None,
               heldout_fraction: float = 0.01, encoding: str = "utf-8"):
    """A ``DatasetDict`` of non-empty lines with ``train``, ``validation`` and ``test`` splits
    (``heldout_fraction`` of the lines each, drawn with a fixed seed)."""
    import datasets

    if data_files:
        files = text_files(data_files, encoding)
        raw = datasets.load_dataset("text", data_files={"train": files}, cache_dir=cache_dir,
                                    encoding=encoding)["train"]
        source = ", ".join(Path(f).name for f in files)
    elif dataset:
        raw = datasets.load_dataset(dataset, split="train", cache_dir=cache_dir)
        source = dataset
    else:
        raise ValueError("no text: pass --data-files FILE_OR_DIR ... or a hub data set with dataset=NAME")
    lines = raw.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(lines) < 3:
        raise ValueError(f"{source}: {len(lines)} usable (non-empty) lines: a masked-LM run needs text, "
                         "at least three lines")
    heldout = max(1, round(len(lines) * heldout_fraction))
    first = lines.train_test_split(test_size=2 * heldout, seed=SPLIT_SEED, shuffle=True)
    second = first["test"].train_test_split(test_size=heldout, seed=SPLIT_SEED, shuffle=True)
    return datasets.DatasetDict(train=first["train"], validation=second["train"], test=second["test"]), source


def train_tokenizer(texts, family: str, vocab_size: int):
    """A WordPiece (BERT) or byte-level BPE (RoBERTa, causal-LM) tokenizer trained on ``texts``,
    wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS[family]
    if family == "bert":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(special.values())))
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(special.values())),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls, sep = (special["cls_token"], special["sep_token"]) if "cls_token" in special else (special["bos_token"],
                                                                                              special["eos_token"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def check_tokenizer_fits(tokenizer, vocab_size: int, source: str, masked: bool = True) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer {source} has {len(tokenizer):,} tokens but the model's vocab_size is "
                         f"{vocab_size:,}: set vocab_size={len(tokenizer)} or use the model's own tokenizer")
    if masked and tokenizer.mask_token_id is None:
        raise ValueError(f"the tokenizer {source} has no mask token: masked-LM needs one ([MASK] or <mask>)")


def check_block_fits(block_size: int, max_positions: int) -> None:
    if block_size > max_positions:
        raise ValueError(f"block_size {block_size} is longer than the model's {max_positions} positions: "
                         f"use block_size <= {max_positions} or a model with more positions")


def group_into_blocks(split, tokenizer, block_size: int, num_proc: int | None = None):
    """Tokenise every line (with its special tokens), concatenate, cut into ``block_size`` blocks;
    the tail that does not fill a block is dropped. Cached by ``datasets``."""

    def tokenize(batch):
        return tokenizer(batch["text"], return_special_tokens_mask=True)

    def blocks(batch):
        joined = {key: sum(batch[key], []) for key in batch}
        usable = len(joined["input_ids"]) // block_size * block_size
        return {key: [values[i:i + block_size] for i in range(0, usable, block_size)] for key, values in joined.items()}

    tokens = split.map(tokenize, batched=True, remove_columns=split.column_names, num_proc=num_proc,
                       desc="tokenizing")
    return tokens.map(blocks, batched=True, num_proc=num_proc, desc=f"blocks of {block_size}")


def mlm_collator(tokenizer, mlm_probability: float = 0.15):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)


def causal_collator(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Full blocks as a batch, each its own labels (the model shifts them: token t predicts t + 1)."""
    input_ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


class BlockStream:
    """Blocks in a shuffled order per epoch, read in global batches; rank r takes its share.

    The order depends only on (seed, epoch), so the position (epoch, batch) is the whole
    state: saved in the checkpoint, it resumes on any world size dividing the batch.
    Masking happens in the collator, from the rank's torch RNG (saved per rank)."""

    def __init__(self, blocks, batch_size: int, collate, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, name: str = "train"):
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) is not divisible by world_size ({world_size}): "
                             f"use a multiple of {world_size}")
        if len(blocks) < batch_size:
            raise ValueError(f"the {name} split has {len(blocks)} blocks, fewer than one batch of {batch_size}: "
                             "use more text, a smaller batch_size or a smaller block_size")
        self.blocks, self.batch_size, self.collate = blocks, batch_size, collate
        self.local = rank_share(batch_size, rank, world_size)
        self.seed, self.shuffle, self.name = seed, shuffle, name
        self.num_batches = len(blocks) // batch_size
        self.epoch, self.batch = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.blocks))
        return torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed + epoch))

    def _batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        ids = self._order(epoch)[index * self.batch_size:(index + 1) * self.batch_size][self.local]
        rows = self.blocks.select(ids.tolist())
        return self.collate([{"input_ids": r["input_ids"], "special_tokens_mask": r["special_tokens_mask"]}
                             for r in rows])

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self._batch(self.epoch, self.batch)
        self.batch += 1
        if self.batch == self.num_batches:
            self.epoch, self.batch = self.epoch + 1, 0
        return batch

    def __iter__(self):
        """The rest of the current epoch without moving the position (evaluation)."""
        for index in range(self.batch, self.num_batches):
            yield self._batch(self.epoch, index)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "batch_size": self.batch_size,
                "num_blocks": len(self.blocks)}

    def load_state_dict(self, state: dict) -> None:
        for field, fix in (("batch_size", "resume with the same global batch_size"),
                           ("num_blocks", "the data or block_size differ from the run being resumed")):
            if state[field] != self.state_dict()[field]:
                raise ValueError(f"the saved {self.name} stream has {field} {state[field]:,} but this one has "
                                 f"{self.state_dict()[field]:,}: {fix}")
        self.epoch, self.batch = state["epoch"], state["batch"]
