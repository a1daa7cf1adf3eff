"""OrderedStream: Transformer-XL's ordered batching, split across ranks, resumable at any step."""

import pytest
import torch

from smoe.data import OrderedStream, check_fits


# tokens = arange(N): every token names its own position, so order is easy to check.
N, B, T = 1003, 4, 10
L = N // B  # 250 tokens per stream, 249 inputs: 24 full segments and a last one of 9


def all_segments(stream):
    return [stream.next_segment() for _ in range(stream.num_segments)]


def test_segments_are_ordered_shifted_and_batch_first():
    stream = OrderedStream(torch.arange(N), B, T)
    assert stream.num_segments == 25 and stream.num_tokens == B * L and stream.tokens_per_segment == B * T
    segments = all_segments(stream)
    for i, seg in enumerate(segments):
        assert seg.inputs.dtype == torch.long and seg.index == i and seg.epoch == 0
        assert seg.inputs.shape == seg.targets.shape == (B, T if i < 24 else 9)
        assert torch.equal(seg.targets, seg.inputs + 1)
        assert torch.equal(seg.inputs[:, 0], torch.arange(B) * L + i * T)
    for prev, nxt in zip(segments, segments[1:]):
        assert torch.equal(nxt.inputs[:, 0], prev.targets[:, -1])  # each stream continues where it stopped
    assert torch.equal(segments[-1].targets[:, -1], torch.arange(1, B + 1) * L - 1)  # streams read to their end


def test_ranks_together_read_the_single_process_batch():
    whole = all_segments(OrderedStream(torch.arange(N), B, T))
    ranks = [all_segments(OrderedStream(torch.arange(N), B, T, rank=r, world_size=2)) for r in range(2)]
    for i, seg in enumerate(whole):
        assert ranks[0][i].inputs.shape[0] == B // 2
        assert torch.equal(torch.cat([r[i].inputs for r in ranks]), seg.inputs)
        assert torch.equal(torch.cat([r[i].targets for r in ranks]), seg.targets)


@pytest.mark.parametrize("world", [3, 6])
def test_uneven_and_empty_shares_still_read_the_batch_once(world):
    """Evaluation at any world size: 4 streams on 3 ranks (1, 1, 2) or on 6 (two ranks with none)."""
    whole = all_segments(OrderedStream(torch.arange(N), B, T))
    ranks = [all_segments(OrderedStream(torch.arange(N), B, T, rank=r, world_size=world)) for r in range(world)]
    assert sorted(r[0].inputs.shape[0] for r in ranks) == sorted([B * (r + 1) // world - B * r // world
                                                                  for r in range(world)])
    assert all(len(r) == len(whole) for r in ranks)  # every rank reads as many segments (collectives stay in step)
    for i, seg in enumerate(whole):
        assert torch.equal(torch.cat([r[i].inputs for r in ranks]), seg.inputs)


def test_next_segment_wraps_to_a_new_epoch():
    stream = OrderedStream(torch.arange(N), B, T)
    first = stream.next_segment()
    assert first.new_epoch and first.epoch == 0
    rest = [stream.next_segment() for _ in range(stream.num_segments - 1)]
    assert not any(seg.new_epoch for seg in rest)
    again = stream.next_segment()
    assert again.new_epoch and again.epoch == 1 and again.index == 0
    assert torch.equal(again.inputs, first.inputs)


def test_iteration_reads_one_epoch_without_moving():
    stream = OrderedStream(torch.arange(N), B, T, name="valid")
    assert len(list(stream)) == len(list(stream)) == stream.num_segments
    for _ in range(3):
        stream.next_segment()
    rest = list(stream)
    assert [seg.index for seg in rest] == list(range(3, stream.num_segments))
    assert stream.next_segment().index == 3


@pytest.mark.parametrize("steps", [7, 25, 31])  # mid-epoch, exactly at the wrap, into the second epoch
def test_resume_reads_the_exact_next_segment(steps):
    stream = OrderedStream(torch.arange(N), B, T)
    for _ in range(steps):
        stream.next_segment()
    resumed = OrderedStream(torch.arange(N), B, T)
    resumed.load_state_dict(stream.state_dict())
    expected, got = stream.next_segment(), resumed.next_segment()
    assert torch.equal(got.inputs, expected.inputs)
    assert (got.index, got.epoch, got.new_epoch) == (expected.index, expected.epoch, expected.new_epoch)


@pytest.mark.parametrize("new_world_size", [1, 4])
def test_resume_at_another_world_size_reads_the_same_global_data(new_world_size):
    old = [OrderedStream(torch.arange(N), B, T, rank=r, world_size=2) for r in range(2)]
    for stream in old:
        for _ in range(5):
            stream.next_segment()
    new = [OrderedStream(torch.arange(N), B, T, rank=r, world_size=new_world_size) for r in range(new_world_size)]
    for stream in new:
        stream.load_state_dict(old[0].state_dict())
    expected = torch.cat([stream.next_segment().inputs for stream in old])
    assert torch.equal(torch.cat([stream.next_segment().inputs for stream in new]), expected)


@pytest.mark.parametrize("other, field", [
    (dict(tokens=torch.arange(N), batch_size=2, tgt_len=T), "batch_size"),
    (dict(tokens=torch.arange(N), batch_size=B, tgt_len=12), "tgt_len"),
    (dict(tokens=torch.arange(N + B), batch_size=B, tgt_len=T), "num_tokens"),
])
def test_incompatible_state_is_refused(other, field):
    state = OrderedStream(torch.arange(N), B, T).state_dict()
    with pytest.raises(ValueError, match=rf"saved train stream has {field} .* but this one has"):
        OrderedStream(**other).load_state_dict(state)


def test_malformed_state_is_refused():
    stream = OrderedStream(torch.arange(N), B, T)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="lacks segment"):
        stream.load_state_dict({k: v for k, v in state.items() if k != "segment"})
    with pytest.raises(ValueError, match=r"segment 25\) is outside"):
        stream.load_state_dict({**state, "segment": 25})


def test_check_fits_needs_one_full_segment_per_stream():
    with pytest.raises(ValueError, match=r"the valid split has 2,000 tokens: too short for batch_size 22 x tgt_len "
                                         r"512 \(needs at least 11,286\): use a smaller batch"):
        check_fits(2_000, 22, 512, "valid")
    check_fits(11_286, 22, 512, "valid")
    stream = OrderedStream(torch.arange(B * (T + 1)), B, T)
    assert stream.num_segments == 1 and stream.next_segment().inputs.shape == (B, T)
    with pytest.raises(ValueError, match="the test split has 43 tokens"):
        OrderedStream(torch.arange(B * (T + 1) - 1), B, T, name="test")
    with pytest.raises(ValueError, match="tgt_len must be a positive integer"):
        check_fits(100, 2, 0, "train")
