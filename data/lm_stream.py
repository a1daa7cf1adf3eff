"""Ordered language-model batches, as Transformer-XL's LMOrderedIterator reads them.

The token sequence is cut into ``batch_size`` contiguous streams read left to right in
segments of ``tgt_len``, so segment i+1 of a stream continues segment i and the model's
memory carries context across segments. ``batch_size`` is global: data-parallel rank r
reads its own block of streams, and the ranks together read exactly the single-process
batch, whatever the world size. Blocks may be uneven, or empty where there are more
ranks than streams (evaluation: the paper's 10 streams on 32 GPUs); training batches
divide evenly, which the DeepSpeed batch layout checks. The position (epoch, segment) is training state, saved
in the checkpoint so that a resumed run reads on where it stopped.

Shapes: B streams (global, ``batch_size``), B_local of them on this rank, L tokens per stream,
T tokens per segment.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


# What a saved position must share with the stream it is loaded into, and the fix when it does not.
_LAYOUT_FIXES = {
    "batch_size": "resume with the same global batch_size (any world_size dividing it)",
    "tgt_len": "resume with the same tgt_len",
    "num_tokens": "the data differs from the run being resumed; resume on the same data file",
}


class Segment(NamedTuple):
    """One segment: ``inputs`` and ``targets`` (inputs shifted by one), ``torch.long`` of shape (B_local, T).

    ``new_epoch`` is True on segment 0 of an epoch: the streams restart there, so
    Transformer-XL memory from the previous segment must be reset.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    index: int
    epoch: int
    new_epoch: bool


def check_fits(num_tokens: int, batch_size: int, tgt_len: int, split_name: str) -> None:
    """Refuse a split too short for one full segment: each of ``batch_size`` streams needs ``tgt_len + 1`` tokens.

    The trainer calls this up front for every split, so that a too-small file fails
    before any model is built.
    """
    for field, value in (("batch_size", batch_size), ("tgt_len", tgt_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    needed = batch_size * (tgt_len + 1)
    if num_tokens < needed:
        raise ValueError(f"the {split_name} split has {num_tokens:,} tokens: too short for batch_size {batch_size} "
                         f"x tgt_len {tgt_len} (needs at least {needed:,}): use a smaller batch or tgt_len, "
                         f"or a bigger file")


def rank_share(rows: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s block of ``rows`` global rows: contiguous, sizes differing by at most one."""
    return slice(rank * rows // world_size, (rank + 1) * rows // world_size)


class OrderedStream:
    """`batch_size` parallel streams over one token sequence, read in order in segments of `tgt_len`."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, tgt_len: int, rank: int = 0, world_size: int = 1,
                 name: str = "train"):
        if tokens.dim() != 1:
            raise ValueError(f"the {name} tokens have shape {tuple(tokens.shape)}: pass a 1-D tensor of token ids")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}: rank must be in [0, world_size)")
        check_fits(tokens.numel(), batch_size, tgt_len, name)
        self.name = name
        self.batch_size = batch_size
        self.tgt_len = tgt_len
        self.stream_len = tokens.numel() // batch_size
        # Stream b is tokens[b*L:(b+1)*L] (TXL's data.view(bsz, -1)); the tail that does not fill a stream is dropped.
        streams_BL = tokens[: batch_size * self.stream_len].view(batch_size, self.stream_len)
        self.streams = streams_BL[rank_share(batch_size, rank, world_size)]
        # The last token of a stream is only ever a target, hence L - 1 inputs to cover.
        self.num_segments = -(-(self.stream_len - 1) // tgt_len)
        self.epoch = 0
        self.segment = 0

    @property
    def num_tokens(self) -> int:
        """Tokens an epoch covers over all ranks: the sequence trimmed to ``batch_size`` equal streams."""
        return self.batch_size * self.stream_len

    @property
    def tokens_per_segment(self) -> int:
        """Input tokens in one full segment over all ranks (the last segment of an epoch may be shorter)."""
        return self.batch_size * self.tgt_len

    def __iter__(self):
        """The rest of the current epoch, from the current position, without moving it (evaluation)."""
        for index in range(self.segment, self.num_segments):
            yield self._segment(index, self.epoch)

    def next_segment(self) -> Segment:
        """The segment at the current position, then move on; past the last segment, epoch + 1 starts (training)."""
        segment = self._segment(self.segment, self.epoch)
        self.segment += 1
        if self.segment == self.num_segments:
            self.epoch, self.segment = self.epoch + 1, 0
        return segment

    def state_dict(self) -> dict:
        """The position of the next segment, with what it is only meaningful for."""
        return {"epoch": self.epoch, "segment": self.segment, "batch_size": self.batch_size,
                "tgt_len": self.tgt_len, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; refused unless the layout is the same (world_size may differ)."""
        missing = [field for field in ("epoch", "segment", *_LAYOUT_FIXES) if field not in state]
        if missing:
            raise ValueError(f"the saved {self.name} stream state lacks {', '.join(missing)}: "
                             f"pass a state saved by OrderedStream.state_dict")
        for field, fix in _LAYOUT_FIXES.items():
            if state[field] != getattr(self, field):
                raise ValueError(f"the saved {self.name} stream has {field} {state[field]:,} but this one has "
                                 f"{getattr(self, field):,}: {fix}")
        if state["epoch"] < 0 or not 0 <= state["segment"] < self.num_segments:
            raise ValueError(f"the saved {self.name} stream position (epoch {state['epoch']}, segment "
                             f"{state['segment']}) is outside epoch >= 0, segment in [0, {self.num_segments}): "
                             f"pass a state saved by OrderedStream.state_dict")
        self.epoch, self.segment = state["epoch"], state["segment"]

    def _segment(self, index: int, epoch: int) -> Segment:
        start = index * self.tgt_len
        seq_len = min(self.tgt_len, self.stream_len - 1 - start)
        window_BT = self.streams[:, start:start + seq_len + 1]
        inputs = window_BT[:, :-1].long().contiguous()
        targets = window_BT[:, 1:].long().contiguous()
        return Segment(inputs, targets, index, epoch, index == 0)
