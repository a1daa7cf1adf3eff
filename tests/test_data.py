import hashlib
import zipfile

import pytest
import torch

from smoe.data import ENWIK8_URL, OrderedStream, check_fits, load_byte_file, load_corpus, load_enwik8
from smoe.data import enwik8 as enwik8_module

# A fake enwik8 small enough for tests: 2,000 bytes with 100-byte valid and test splits.
FAKE_BYTES, FAKE_HELDOUT = 2_000, 100


@pytest.fixture
def fake_enwik8(tmp_path, monkeypatch):
    """A zip holding a 2,000-byte `enwik8`, its bytes and sha256, with the size constants patched to match."""
    monkeypatch.setattr(enwik8_module, "ENWIK8_BYTES", FAKE_BYTES)
    monkeypatch.setattr(enwik8_module, "ENWIK8_HELDOUT_BYTES", FAKE_HELDOUT)
    content = bytes(torch.randint(0, 256, (FAKE_BYTES,), generator=torch.Generator().manual_seed(0)).tolist())
    source = tmp_path / "mirror"
    source.mkdir()
    archive = source / "enwik8.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("enwik8", content)
    return archive, content, hashlib.sha256(archive.read_bytes()).hexdigest()


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_txl_split(splits, content):
    cut = FAKE_BYTES - 2 * FAKE_HELDOUT
    assert (splits.train.numel(), splits.valid.numel(), splits.test.numel()) == (cut, FAKE_HELDOUT, FAKE_HELDOUT)
    assert splits.train.dtype == torch.uint8
    assert bytes(splits.train.tolist()) == content[:cut]
    assert bytes(splits.valid.tolist()) == content[cut:cut + FAKE_HELDOUT]
    assert bytes(splits.test.tolist()) == content[-FAKE_HELDOUT:]
    assert splits.source == "enwik8"


def test_download_verifies_unzips_and_splits_like_transformer_xl(tmp_path, fake_enwik8, capsys):
    archive, content, digest = fake_enwik8
    data_dir = tmp_path / "data"
    splits = load_enwik8(data_dir, url=archive.as_uri(), sha256=digest)
    assert_txl_split(splits, content)
    assert (data_dir / "enwik8.zip").read_bytes() == archive.read_bytes()
    assert sorted(p.name for p in data_dir.iterdir()) == ["enwik8", "enwik8.zip"]  # no temporary files left
    assert "downloading" in capsys.readouterr().err
    # A second load reads the unzipped file and needs no network.
    assert_txl_split(load_enwik8(data_dir, download=False, url="http://unreachable.invalid/x.zip"), content)


def test_zip_already_present_is_verified_and_unzipped(tmp_path, fake_enwik8):
    archive, content, digest = fake_enwik8
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "enwik8.zip").write_bytes(archive.read_bytes())
    assert_txl_split(load_enwik8(data_dir, download=False, sha256=digest), content)


def test_zip_with_wrong_checksum_is_refused_and_left_untouched(tmp_path, fake_enwik8):
    archive, _, digest = fake_enwik8
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "enwik8.zip").write_bytes(archive.read_bytes())
    wrong = "0" * 64
    with pytest.raises(ValueError, match=rf"sha256 {digest}, expected {wrong}.*corrupt.*delete it"):
        load_enwik8(data_dir, sha256=wrong)
    assert (data_dir / "enwik8.zip").read_bytes() == archive.read_bytes()
    assert not (data_dir / "enwik8").exists()


def test_real_checksum_is_the_default(tmp_path, fake_enwik8):
    archive, _, digest = fake_enwik8
    with pytest.raises(ValueError, match=rf"sha256 {digest}, expected {enwik8_module.ENWIK8_ZIP_SHA256}"):
        enwik8_module.verify_zip(archive)


def test_bad_download_never_takes_the_final_name(tmp_path, fake_enwik8):
    archive, _, _ = fake_enwik8
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="download of .* corrupt"):
        load_enwik8(data_dir, url=archive.as_uri(), sha256="0" * 64)
    assert list(data_dir.iterdir()) == []
    with pytest.raises(ConnectionError, match="could not download"):
        load_enwik8(data_dir, url=(tmp_path / "absent.zip").as_uri())
    assert list(data_dir.iterdir()) == []


def test_missing_data_without_download_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{ENWIK8_URL}.*--data-file"):
        load_enwik8(tmp_path, download=False)


def test_unzipped_enwik8_of_the_wrong_size_is_refused(tmp_path, fake_enwik8):
    (tmp_path / "enwik8").write_bytes(b"x" * (FAKE_BYTES - 1))
    with pytest.raises(ValueError, match=r"1,999 bytes, but enwik8 is exactly 2,000.*delete it"):
        load_enwik8(tmp_path)


@pytest.mark.parametrize("members, error", [
    ({"other.txt": b"x" * FAKE_BYTES}, "no member named 'enwik8'"),
    ({"enwik8": b"x" * 10}, "10 bytes, but enwik8 is exactly 2,000"),
])
def test_zip_that_is_not_enwik8_is_refused(tmp_path, fake_enwik8, members, error):
    digest = make_zip(tmp_path / "enwik8.zip", members)
    with pytest.raises(ValueError, match=error):
        load_enwik8(tmp_path, sha256=digest)
    assert not (tmp_path / "enwik8").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enwik8.zip", "mirror"]


def test_corrupt_zip_is_refused(tmp_path):
    (tmp_path / "enwik8.zip").write_bytes(b"not a zip at all")
    digest = hashlib.sha256(b"not a zip at all").hexdigest()
    with pytest.raises(ValueError, match="not a readable zip.*corrupt"):
        load_enwik8(tmp_path, sha256=digest)


def test_byte_file_splits_90_5_5_in_order(tmp_path):
    content = bytes(range(256)) * 4 + b"tail"  # 1,028 bytes: 51 each held out
    path = tmp_path / "corpus.bin"
    path.write_bytes(content)
    splits = load_corpus(data_file=path)
    assert (splits.train.numel(), splits.valid.numel(), splits.test.numel()) == (926, 51, 51)
    assert bytes(torch.cat([splits.train, splits.valid, splits.test]).tolist()) == content
    assert bytes(splits.test[-4:].tolist()) == b"tail"
    assert splits.source == "corpus.bin"


@pytest.mark.parametrize("size", [0, 19])
def test_byte_file_too_small_for_three_splits(tmp_path, size):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"a" * size)
    with pytest.raises(ValueError, match=rf"tiny.txt has {size} bytes.*at least 20"):
        load_byte_file(path)
    path.write_bytes(b"a" * 20)
    splits = load_byte_file(path)  # the smallest file that splits
    assert (splits.train.numel(), splits.valid.numel(), splits.test.numel()) == (18, 1, 1)


def test_corpus_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one.*neither"):
        load_corpus()
    with pytest.raises(ValueError, match="exactly one.*both"):
        load_corpus(data_dir=tmp_path, data_file=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="--data-file"):
        load_corpus(data_file=tmp_path / "absent.txt")


# ----- OrderedStream -----------------------------------------------------------------------------------
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
