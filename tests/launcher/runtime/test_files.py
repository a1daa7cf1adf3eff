"""Atomic writes: a failure part-way leaves the old file whole and no temporary file behind."""

import pytest

from smoe.launcher.runtime.files import atomic_output, write_atomic, write_through_temporary


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "eval.json"
    write_atomic(target, '{"old": 1}')

    def half_then_fail(f):
        f.write(b'{"new": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_through_temporary(target, half_then_fail)
    assert target.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_writer_by_file_name_gets_a_temporary_renamed_only_on_success(tmp_path):
    target = tmp_path / "figure.png"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != target  # matplotlib picks the format from it
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("plotting failed")
    assert target.read_bytes() == b"png" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]
