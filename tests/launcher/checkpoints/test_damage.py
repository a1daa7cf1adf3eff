"""Damaged checkpoints and full disks, end to end on the small model.

A run with two checkpoints (steps 5 and 10 of 12) has a file of its newest one truncated,
corrupted, replaced by another model's, removed, or changed by one flipped bit that torch.load
does not notice: `smoe train --resume`, `smoe eval`, `smoe ckpt consolidate` and `smoe slim`
name the file and why, use step 5 instead (and the resumed run gives the losses of the
uninterrupted one), and leave the damaged files where they are. With every checkpoint damaged
the error lists each. A missing or damaged `latest` is followed by the newest step directory
whose save completed (it has a manifest), never by one a killed save left. A save that finds the disk
full (a real tmpfs, mounted for the test) stops the run with exit code 4 naming the file
and the reason; `latest` and the checkpoint before are untouched, and once space is freed
the run resumes from it to the end.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zipfile
import zlib

import pytest
import torch

from runs import SMALL, scalars, smoe

RUN = ["--preset", "tiny", *SMALL, "max_steps=12", "save_every=5", "keep_checkpoints=2"]
NOTE = "note: checkpoint step000010 is damaged ("


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """``straight``: 12 steps uninterrupted; ``split``: stopped at 10, checkpoints step000005 and step000010."""
    root = tmp_path_factory.mktemp("damage")
    smoe("train", "--out", root / "straight", "--data-file", corpus, *RUN)
    smoe("train", "--out", root / "split", "--data-file", corpus, *RUN, "--stop-at", "10")
    assert sorted(p.name for p in (root / "split" / "checkpoints").iterdir()) == ["latest", "step000005",
                                                                                 "step000010"]
    return root


def copy_of_split(runs, tmp_path):
    shutil.copytree(runs / "split", tmp_path / "run")
    return tmp_path / "run", tmp_path / "run" / "checkpoints"


def largest_file(tag_dir):
    return max(tag_dir.iterdir(), key=lambda p: p.stat().st_size)


def truncate(path) -> bytes:
    """Cut ``path`` to half its size (a copy killed midway, a full disk); returns what is left."""
    data = path.read_bytes()[:path.stat().st_size // 2]
    path.write_bytes(data)
    return data


def flip_a_bit_in_tensor_data(path) -> None:
    """Flip one bit in the middle of the bytes of the largest tensor in torch file ``path``: torch.load
    still reads it (no check covers tensor bytes), the tensor is silently different."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x10
    path.write_bytes(data)


def remove_manifests(checkpoints) -> None:
    """Make the checkpoints look like an smoe older than manifests wrote them."""
    for manifest in checkpoints.glob("step*/manifest.json"):
        manifest.unlink()


def snapshot(directory) -> dict:
    """Every file under ``directory``: its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def resume(run, corpus, *args, check: bool = True):
    return smoe("train", "--out", run, "--data-file", corpus, *RUN, *args, "--resume", check=check)


def same_losses_as_straight(run, runs, steps=range(6, 13)) -> None:
    straight, resumed = scalars(runs / "straight", "train/loss"), scalars(run, "train/loss")
    assert [resumed[s] for s in steps] == [straight[s] for s in steps]
    assert json.loads((run / "eval.json").read_text()) == json.loads((runs / "straight" / "eval.json").read_text())


def test_a_truncated_file_in_the_newest_checkpoint_resumes_from_the_one_before(runs, corpus, tmp_path):
    run, checkpoints = copy_of_split(runs, tmp_path)
    damaged = largest_file(checkpoints / "step000010")
    size = damaged.stat().st_size
    left = truncate(damaged)
    result = resume(run, corpus)
    assert f"{NOTE}{damaged.name}: {len(left)} bytes, {size} when saved (truncated since the save)); " in result.stdout
    assert "resuming from step000005 instead; step000010 is kept" in result.stdout
    assert "at step 5" in result.stdout
    same_losses_as_straight(run, runs)
    # Saving step 10 again set the damaged directory aside instead of overwriting it.
    assert "kept as step000010.old" in result.stdout
    assert (checkpoints / "step000010.old" / damaged.name).read_bytes() == left
    assert (checkpoints / "latest").read_text() == "step000012"


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "older-smoe"])
def test_a_damaged_expert_file_is_named(runs, corpus, tmp_path, with_manifest):
    """Its manifest's checksum names it; without a manifest (an older smoe's checkpoint) torch.load does."""
    run, checkpoints = copy_of_split(runs, tmp_path)
    if not with_manifest:
        remove_manifests(checkpoints)
    expert = checkpoints / "step000010" / "layer_1_expert_2_mp_rank_00_model_states.pt"
    garbage = b"\0" * 64 + expert.read_bytes()[64:]  # its zip header overwritten
    expert.write_bytes(garbage)
    result = resume(run, corpus, "--stop-at", "6")
    why = "checksum mismatch: its bytes changed since the save" if with_manifest else "truncated or corrupt: "
    assert f"{NOTE}layer_1_expert_2_mp_rank_00_model_states.pt: {why}" in result.stdout
    assert "resuming from step000005 instead" in result.stdout
    assert expert.read_bytes() == garbage


@pytest.mark.parametrize("name", ["layer_0_expert_1_mp_rank_00_model_states.pt", "rank0.pt",
                                  "expp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_bit_flipped_inside_a_tensor_is_caught_by_the_checksum(runs, corpus, tmp_path, name):
    """An expert's weights, the saved Transformer-XL memory, Adam's moments: each readable after the flip."""
    run, checkpoints = copy_of_split(runs, tmp_path)
    damaged = checkpoints / "step000010" / name
    flip_a_bit_in_tensor_data(damaged)
    torch.load(damaged, weights_only=False)  # the flip is silent to torch
    flipped = damaged.read_bytes()
    result = resume(run, corpus)
    assert f"{NOTE}{name}: checksum mismatch: its bytes changed since the save (a flipped bit or a bad copy)); " \
           "resuming from step000005 instead; step000010 is kept" in result.stdout
    same_losses_as_straight(run, runs)
    assert (checkpoints / "step000010.old" / name).read_bytes() == flipped


def test_a_missing_rank_file_is_named_and_pruning_keeps_the_newer_checkpoint(runs, corpus, tmp_path):
    run, checkpoints = copy_of_split(runs, tmp_path)
    (checkpoints / "step000010" / "rank0.pt").unlink()
    before = snapshot(checkpoints / "step000010")
    # keep_checkpoints=1: saving step 7 prunes what is older than it, never step 10, which is newer
    result = resume(run, corpus, "--stop-at", "7", "keep_checkpoints=1")
    assert f"{NOTE}rank0.pt missing); resuming from step000005 instead; step000010 is kept" in result.stdout
    assert (checkpoints / "latest").read_text() == "step000007"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step000007", "step000010"]
    assert snapshot(checkpoints / "step000010") == before


def test_an_expert_file_of_another_model_size_is_refused(runs, corpus, tmp_path):
    """Without a manifest (the manifest would name the file by its size first), the shapes are compared."""
    run, checkpoints = copy_of_split(runs, tmp_path)
    remove_manifests(checkpoints)
    smoe("train", "--out", tmp_path / "wider", "--data-file", corpus, *RUN, "d_ff=128", "--stop-at", "1")
    name = "layer_0_expert_1_mp_rank_00_model_states.pt"
    shutil.copy(tmp_path / "wider" / "checkpoints" / "step000001" / name, checkpoints / "step000010" / name)
    result = resume(run, corpus, "--stop-at", "6")
    assert f"{NOTE}{name}: shapes do not match the model: layers.0.ffn.deepspeed_moe.experts.deepspeed_experts.1." \
           in result.stdout
    assert "is [32, 32] in the file, [16, 32] in the model" in result.stdout
    assert "resuming from step000005 instead" in result.stdout


def test_when_every_checkpoint_is_damaged_the_error_lists_each_and_nothing_changes(runs, corpus, tmp_path):
    run, checkpoints = copy_of_split(runs, tmp_path)
    damaged = largest_file(checkpoints / "step000010")
    truncate(damaged)
    (checkpoints / "step000005" / "layer_0_expert_0_mp_rank_00_model_states.pt").unlink()
    before = snapshot(checkpoints)
    result = resume(run, corpus, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("smoe: error: no checkpoint in ") and "tried step000010, step000005" in error
    assert f"step000010: {damaged.name}: " in error and "(truncated since the save)" in error
    assert "step000005: layer_0_expert_0_mp_rank_00_model_states.pt missing" in error
    assert "start a new run" in error
    assert snapshot(checkpoints) == before


def test_eval_consolidate_and_slim_use_the_older_checkpoint_with_the_same_note(runs, corpus, tmp_path):
    from safetensors import safe_open

    run, checkpoints = copy_of_split(runs, tmp_path)
    expert = checkpoints / "step000010" / "layer_0_expert_3_mp_rank_00_model_states.pt"
    size = expert.stat().st_size
    left = truncate(expert)
    note = f"{NOTE}{expert.name}: {len(left)} bytes, {size} when saved (truncated since the save)); "

    result = smoe("eval", run, "--k", "1,4", "--json", tmp_path / "eval.json")
    assert note in result.stdout and "using step000005 instead; step000010 is kept" in result.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint"] == "step000005"

    result = smoe("ckpt", "consolidate", run, tmp_path / "model.safetensors")
    assert note in result.stdout and "using step000005 instead; step000010 is kept" in result.stdout
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["checkpoint"] == "step000005"

    result = smoe("slim", run, "--budget", "2", "--data", corpus, "--max-examples", "20", "--out", tmp_path / "slim")
    assert note in result.stdout and "using step000005 instead" in result.stdout
    assert json.loads((tmp_path / "slim" / "slim.json").read_text())["checkpoint"] == "step000005"

    assert expert.read_bytes() == left
    assert (checkpoints / "latest").read_text() == "step000010"


def test_the_manifest_lists_every_file_of_the_step_directory_with_its_size_and_crc32(runs):
    for tag_dir in (runs / "split" / "checkpoints").glob("step*"):
        manifest = json.loads((tag_dir / "manifest.json").read_text())
        files = {p.name: p.read_bytes() for p in tag_dir.iterdir() if p.name != "manifest.json"}
        assert manifest == {"checksum": "crc32", "files": {
            name: {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"} for name, data in sorted(files.items())}}


def test_a_checkpoint_without_a_manifest_loads_as_before(runs, corpus, tmp_path):
    run, checkpoints = copy_of_split(runs, tmp_path)
    remove_manifests(checkpoints)
    result = resume(run, corpus)
    assert "note:" not in result.stdout and "at step 10" in result.stdout
    same_losses_as_straight(run, runs, steps=range(11, 13))


# --- a missing or damaged `latest` ---------------------------------------------------------------

@pytest.mark.parametrize("content, why", [
    (b"", "`latest` is empty"),
    (b"\x8f\x00step0\xff", "`latest` names '\\ufffd\\x00step0\\ufffd', which is not a directory in "),
    (b"step000099\n", "`latest` names 'step000099', which is not a directory in "),
], ids=["empty", "garbage", "gone"])
def test_a_damaged_latest_resumes_from_the_newest_complete_checkpoint(runs, corpus, tmp_path, content, why):
    run, checkpoints = copy_of_split(runs, tmp_path)
    (checkpoints / "latest").write_bytes(content)
    result = resume(run, corpus)
    assert f"note: {why}" in result.stdout
    assert "; resuming from step000010, the newest checkpoint whose save completed" in result.stdout
    assert "at step 10" in result.stdout
    same_losses_as_straight(run, runs, steps=range(11, 13))
    assert (checkpoints / "latest").read_text() == "step000012"


def test_a_missing_latest_is_found_by_auto_resume_and_a_damaged_newest_checkpoint_skipped(runs, corpus, tmp_path):
    """Without the fallback --auto-resume would start the run over from step 0."""
    run, checkpoints = copy_of_split(runs, tmp_path)
    (checkpoints / "latest").unlink()
    flip_a_bit_in_tensor_data(checkpoints / "step000010" / "rank0.pt")
    result = smoe("train", "--out", run, "--data-file", corpus, *RUN, "--auto-resume")
    assert ("note: `latest` is missing; checkpoint step000010 is damaged (rank0.pt: checksum mismatch: its bytes "
            "changed since the save (a flipped bit or a bad copy)); resuming from step000005 instead; step000010 is "
            "kept") in result.stdout
    same_losses_as_straight(run, runs)


def test_step_directories_without_manifest_or_latest_are_no_checkpoint_and_are_kept(runs, corpus, tmp_path):
    """A run killed before its first save completed: --resume refuses, naming them; --auto-resume starts
    over and sets them aside instead of deleting them."""
    run, checkpoints = copy_of_split(runs, tmp_path)
    (checkpoints / "latest").unlink()
    remove_manifests(checkpoints)
    before = {tag: snapshot(checkpoints / tag) for tag in ("step000005", "step000010")}
    refused = resume(run, corpus, check=False)
    assert refused.returncode == 2
    assert (f"smoe: error: {checkpoints} holds no complete checkpoint (`latest` is missing; step000005, step000010 "
            "have no manifest: saves killed midway, or of an smoe older than manifests; to load one of the latter, "
            "write its name into `latest`)") in refused.stderr
    result = smoe("train", "--out", run, "--data-file", corpus, *RUN, "--auto-resume")
    assert f"resumed {run}" not in result.stdout and "it started over): kept as step000005.old" in result.stdout
    same_losses_as_straight(run, runs, steps=range(1, 13))
    assert {tag: snapshot(checkpoints / f"{tag}.old") for tag in before} == before


# --- a full disk -------------------------------------------------------------------------------

def mount_tmpfs(directory, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``directory``; the reason when that is impossible."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                            capture_output=True, text=True)
    return None if result.returncode == 0 else f"mount -t tmpfs failed: {result.stderr.strip()}"


def remount(directory, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(directory)], check=True, capture_output=True)


def used_bytes(directory) -> int:
    stat = os.statvfs(directory)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def disk_full_run(runs, corpus, run, checkpoints, shrink, grow, reason: str) -> None:
    """One checkpoint (step 5) written; ``shrink()`` leaves no room for the next; the resumed run fails to
    save step 10 and stops with exit code 4; ``grow()`` frees space and the run resumes from step 5 to the end."""
    smoe("train", "--out", run, "--data-file", corpus, *RUN, "--stop-at", "5")
    shrink()
    before = snapshot(checkpoints / "step000005")
    failed = resume(run, corpus, check=False)
    assert failed.returncode == 4, failed.stdout[-2000:] + failed.stderr[-3000:]
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("smoe: error: checkpoint step000010 (step 10) could not be written: ")
    assert str(checkpoints / "step000010") in error and reason in error
    assert "`latest` still names step000005" in error
    assert (checkpoints / "latest").read_text() == "step000005"
    assert snapshot(checkpoints / "step000005") == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step000005"]  # no half checkpoint, no .tmp

    grow()
    resumed = resume(run, corpus)
    assert "at step 5" in resumed.stdout
    same_losses_as_straight(run, runs)
    assert (checkpoints / "latest").read_text() == "step000012"


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(runs, corpus, tmp_path):
    disk = tmp_path / "disk"
    why_not = mount_tmpfs(disk, "16m")
    if why_not:
        pytest.skip(f"{why_not}; test_a_read_only_checkpoint_directory_... covers the same path without root")
    try:
        run, checkpoints = disk / "run", disk / "run" / "checkpoints"
        checkpoint_size = sum(p.stat().st_size for p in (runs / "split" / "checkpoints" / "step000005").iterdir())

        def shrink():  # room for about half a checkpoint more
            remount(disk, used_bytes(disk) + checkpoint_size // 2)

        disk_full_run(runs, corpus, run, checkpoints, shrink, lambda: remount(disk, 16 << 20),
                      "No space left on device")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
        if os.path.ismount(disk):
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def permissions_enforced(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def test_a_read_only_checkpoint_directory_stops_the_run_and_keeps_the_previous_checkpoint(runs, corpus, tmp_path):
    if not permissions_enforced(tmp_path):
        pytest.skip("root ignores directory permissions: test_a_full_disk_... covers this path with a real tmpfs")
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    try:
        disk_full_run(runs, corpus, run, checkpoints, lambda: checkpoints.chmod(0o555),
                      lambda: checkpoints.chmod(0o755), "Permission denied")
    finally:
        checkpoints.chmod(0o755)
