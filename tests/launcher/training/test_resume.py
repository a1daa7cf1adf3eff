"""`smoe train --resume` / `--auto-resume` continue the run that was started: its saved config.json,
only the keys given on the command line changed, and the k and lr schedules stretched when
max_steps moves. Real tiny runs, real checkpoints, TensorBoard events read back."""

from __future__ import annotations

import json

import pytest

from smoe.launcher.config import TrainConfig
from smoe.launcher.training.lr import lr_multiplier

from runs import SMALL, scalars, smoe


def saved_config(out) -> TrainConfig:
    return TrainConfig.from_saved(json.loads((out / "config.json").read_text()))


def test_a_resume_without_overrides_ends_where_the_run_was_to_end(corpus, tmp_path):
    """Started with max_steps=8 and shape overrides, resumed with none of them: steps 4 -> 8, not
    the preset's 1000 (nor a refusal for a model the command line no longer describes)."""
    out = tmp_path / "run"
    smoe("train", "--out", out, "--data-file", corpus, *SMALL, "max_steps=8", "--stop-at", "4")
    resumed = smoe("train", "--preset", "tiny", "--data-file", corpus, "--out", out, "--resume")
    assert "resume changes" not in resumed.stdout and "steps 4->8" in resumed.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step000008"
    assert sorted(scalars(out, "train/loss")) == list(range(1, 9)) and (out / "eval.json").is_file()
    assert saved_config(out).max_steps == 8

    # The finished run: its lr decayed to lr_min=0, so going on would train at lr 0.
    extended = smoe("train", "--out", out, "--resume", "max_steps=12", check=False)
    assert extended.returncode == 2 and "max_steps=12: the run had finished its schedules at step 8" in \
        extended.stderr and "pass lr_min" in extended.stderr
    # With a floor it goes on at that floor: lr and lr_min given on resume replace the checkpoint's values.
    extended = smoe("train", "--out", out, "--resume", "max_steps=10", "lr=2e-3", "lr_min=5e-4")
    assert "resume changes lr: 0.001 -> 0.002" in extended.stdout and "finished its schedules at step 8" in \
        extended.stdout
    lr = scalars(out, "train/lr")
    assert lr[8] == 0 and lr[9] == lr[10] == pytest.approx(5e-4)
    # A model change is refused as before, before anything is loaded.
    reshaped = smoe("train", "--out", out, "--auto-resume", "d_model=64", check=False)
    assert reshaped.returncode == 2 and "d_model: saved 32, now 64" in reshaped.stderr
    assert saved_config(out).max_steps == 10


def test_a_resume_that_moves_max_steps_stretches_k_and_lr_to_the_new_end(corpus, tmp_path):
    """Planned for 8 steps, stopped at 4, auto-resumed with max_steps=16: that change is printed, the run
    ends at 16, k and the lr at every step are the plan's (the same as before for steps 1-4), k never
    decreases, the lr goes on from its value at step 4 without a jump and is lr_min at 16."""
    out = tmp_path / "run"
    started = [*SMALL, "max_steps=8", "lr_min=1e-4"]
    smoe("train", "--out", out, "--data-file", corpus, *started, "--stop-at", "4")
    first_lr = scalars(out, "train/lr")
    # As a Slurm requeue does: the job's own overrides again (no change), and one new.
    resumed = smoe("train", "--out", out, "--data-file", corpus, "--auto-resume", *started, "max_steps=16")
    assert resumed.stdout.count("resume changes") == 1 and "resume changes max_steps: 8 -> 16" in resumed.stdout
    assert "steps 4->16" in resumed.stdout
    config = saved_config(out)
    assert (config.max_steps, config.earlier_max_steps) == (16, ((4, 8),))
    assert (out / "checkpoints" / "latest").read_text() == "step000016"

    top_k, lr = scalars(out, "moe/top_k"), scalars(out, "train/lr")  # logged after step s: k of step s - 1
    assert sorted(top_k) == sorted(lr) == list(range(1, 17))
    ks = [top_k[s] for s in range(1, 17)]
    assert ks == [config.k_schedule()(s) for s in range(16)] and ks == sorted(ks)
    assert config.k_schedule()(16) == config.k_max
    multiplier = lr_multiplier(config)
    assert [lr[s] for s in range(1, 5)] == pytest.approx([first_lr[s] for s in range(1, 5)])
    assert [lr[s] for s in range(1, 17)] == pytest.approx([config.lr * multiplier(s) for s in range(1, 17)])
    after_warmup = [lr[s] for s in range(config.warmup_steps, 17)]
    assert after_warmup == sorted(after_warmup, reverse=True)
    assert 0 < lr[4] - lr[5] < lr[3] - lr[4]  # at step 4 no jump: the decay goes on, stretched (slower)
    assert lr[16] == pytest.approx(1e-4)
