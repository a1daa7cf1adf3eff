"""Runs in another precision than fp32 (bf16 on CPU; fp16 needs a GPU, see tests/gpu): resuming
keeps the run's DeepSpeed config, a changed one restarts the optimizer and says so, the frozen
router stays fp32 inside a bf16 engine, and fp16 overflows are survived up to a bound."""

from __future__ import annotations

import json
import math

import pytest

from smoe.launcher.config import build_config, parse_override
from smoe.launcher.runtime.distributed import spawn
from smoe.launcher.training.losses import OverflowGuard, TrainingDiverged
from smoe.launcher.training.trainer import Trainer

from runs import SMALL, scalars, smoe

BF16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}


def bf16_config(tmp_path):
    path = tmp_path / "bf16.json"
    path.write_text(json.dumps(BF16))
    return path


def test_resume_without_repeating_ds_config_keeps_the_runs_precision(corpus, tmp_path):
    common = ["--preset", "tiny", "--data-file", corpus, *SMALL, "max_steps=6", "dropout=0"]
    ds = f"ds_config={bf16_config(tmp_path)}"
    smoe("train", "--out", tmp_path / "straight", *common, ds)
    smoe("train", "--out", tmp_path / "split", *common, ds, "--stop-at", "3")
    resumed = smoe("train", "--out", tmp_path / "split", *common, "--resume")  # no ds_config= this time
    assert "RESTARTS" not in resumed.stdout
    assert json.loads((tmp_path / "split" / "config.json").read_text())["ds_config"] == ds.split("=", 1)[1]
    straight, split = scalars(tmp_path / "straight", "train/loss"), scalars(tmp_path / "split", "train/loss")
    assert split == straight  # the bf16 optimizer's states resumed exactly


def test_resume_in_another_precision_loads_the_weights_and_restarts_the_optimizer(corpus, tmp_path):
    common = ["--preset", "tiny", "--data-file", corpus, *SMALL, "max_steps=6"]
    smoe("train", "--out", tmp_path / "run", *common, f"ds_config={bf16_config(tmp_path)}", "--stop-at", "3")
    resumed = smoe("train", "--out", tmp_path / "run", *common, "ds_config=cpu", "--resume")
    assert "the checkpoint's optimizer is bf16, ZeRO stage 0, this run's is fp32, ZeRO stage 0" in resumed.stdout
    assert "optimizer RESTARTS" in resumed.stdout and "at step 3" in resumed.stdout
    assert sorted(scalars(tmp_path / "run", "train/loss")) == list(range(1, 7))


def _router_dtypes_in_a_bf16_engine(rank, world, config, out):
    trainer = Trainer(config, out)
    model = trainer.engine.module
    routers = [m.router for m in model.modules() if hasattr(m, "router")]
    out.joinpath("dtypes.json").write_text(json.dumps({
        "router": sorted({str(b.dtype) for r in routers for b in r.buffers()}),
        "experts": sorted({str(p.dtype) for r in model.modules() if hasattr(r, "local_experts")
                           for e in r.local_experts for p in e.parameters()})}))


def test_a_bf16_engine_keeps_the_frozen_router_fp32(corpus, tmp_path):
    overrides = dict(parse_override(o) for o in SMALL)
    config = build_config("tiny", {**overrides, "data_file": str(corpus), "ds_config": str(bf16_config(tmp_path))})
    spawn(_router_dtypes_in_a_bf16_engine, 1, config, tmp_path / "run")
    dtypes = json.loads((tmp_path / "run" / "dtypes.json").read_text())
    assert dtypes == {"router": ["torch.float32"], "experts": ["torch.bfloat16"]}


@pytest.mark.parametrize("ds", [{"fp16": {"enabled": True}}, {"bf16": {"enabled": True}}, {}])
def test_non_finite_losses_stop_at_once_unless_a_loss_scaler_can_recover(tmp_path, ds):
    guard = OverflowGuard(ds, patience=2)
    survived = 2 if ds.get("fp16") else 0
    for step in range(1, survived + 1):
        guard.check(math.inf, 0.0, step, 4, tmp_path)  # DeepSpeed skips these updates and lowers the scale
    with pytest.raises(TrainingDiverged, match=f"loss is nan at step {survived + 1}"):
        guard.check(math.nan, 0.0, survived + 1, 4, tmp_path)


def test_a_finite_loss_resets_the_overflow_count(tmp_path):
    guard = OverflowGuard({"fp16": {"enabled": True}}, patience=1)
    for step in range(1, 6):
        guard.check(math.inf if step % 2 else 2.5, 0.0, step, 4, tmp_path)
    assert guard.in_a_row == 1
