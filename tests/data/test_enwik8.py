"""enwik8 and byte files: the download verified and unzipped, the 90/5/5 split, the refusals."""

import hashlib
import zipfile

import pytest
import torch

from smoe.data import ENWIK8_URL, load_byte_file, load_corpus, load_enwik8
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
