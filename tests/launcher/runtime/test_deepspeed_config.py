"""The packaged DeepSpeed configs and the batch arithmetic that must agree with them."""

from __future__ import annotations

import pytest
import torch

from smoe.launcher.config import build_config
from smoe.launcher.runtime import deepspeed_config
from smoe.launcher.runtime.engine import engine_config


def parsed_by_deepspeed(name: str):
    """DeepSpeed's own reading of a packaged config, filled in for a run on one rank that fits its batch keys."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds, _ = deepspeed_config.load(name)
    micro = ds.get("train_micro_batch_size_per_gpu", ds.get("train_batch_size", 1))
    batch = ds.get("train_batch_size", micro)
    run = build_config("paper", {"ds_config": name, "batch_size": batch, "grad_accum": batch // micro})
    return DeepSpeedConfig(engine_config(run, 1, None))


@pytest.mark.parametrize("name", deepspeed_config.packaged())
def test_every_packaged_config_loads_and_is_supported_with_experts(name):
    ds, source = deepspeed_config.load(name)
    deepspeed_config.check_supported(ds, source, has_experts=True)
    assert parsed_by_deepspeed(name).zero_optimization_stage == ds.get("zero_optimization", {}).get("stage", 0)


def test_bf16_configs_for_many_ranks_reduce_and_accumulate_gradients_in_fp32():
    """bf16 keeps 8 mantissa bits: gradients summed over 16-64 ranks in bf16 lose the small ones, so
    configs for many ranks communicate in fp32 and keep the reduced partition in fp32. fp16 (10 bits)
    reduces in fp16 under its loss scaler, DeepSpeed's usual practice (v100x8-bert-fp16); and a config
    whose train_batch_size is its micro batch is for one rank, with nothing to reduce."""
    def for_many_ranks_in_bf16(name):
        ds, _ = deepspeed_config.load(name)
        one_rank = ds.get("train_batch_size", 0) == ds.get("train_micro_batch_size_per_gpu")
        return ds.get("bf16", {}).get("enabled") and not one_rank

    names = [name for name in deepspeed_config.packaged() if for_many_ranks_in_bf16(name)]
    assert "multinode-bf16" in names
    for name in names:
        parsed = parsed_by_deepspeed(name)
        assert (parsed.communication_data_type, parsed.grad_accum_dtype) == (torch.float32, "fp32"), name


def test_the_paper_setups_fit_their_configs():
    a6000 = engine_config(build_config("paper", {"ds_config": "a6000-txl-bf16"}), 1, None)
    assert (a6000["train_batch_size"], a6000["train_micro_batch_size_per_gpu"], a6000["bf16"]["enabled"]) == (22, 22, True)
    v100 = engine_config(build_config("paper", {"ds_config": "v100x8-bert-fp16", "batch_size": 64}), 8, None)
    assert v100["train_micro_batch_size_per_gpu"] == 8 and v100["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert v100["zero_optimization"]["stage"] == 2
    # the same global batch on 2 GPUs needs 4 accumulation steps
    on_two = engine_config(build_config("paper", {"ds_config": "v100x8-bert-fp16", "batch_size": 64,
                                                  "grad_accum": 4}), 2, None)
    assert (on_two["train_micro_batch_size_per_gpu"], on_two["gradient_accumulation_steps"]) == (8, 4)


def test_batch_accumulation_and_ranks_must_agree():
    with pytest.raises(ValueError, match=r"v100x8-bert-fp16.json sets train_micro_batch_size_per_gpu=8.*grad_accum=4"):
        engine_config(build_config("paper", {"ds_config": "v100x8-bert-fp16", "batch_size": 64}), 2, None)
    with pytest.raises(ValueError, match=r"train_batch_size=22.*use batch_size=22"):
        engine_config(build_config("paper", {"ds_config": "a6000-txl-bf16", "batch_size": 16}), 1, None)
    with pytest.raises(ValueError, match=r"batch_size \(22\).*not divisible by 4.*multiple of 4"):
        engine_config(build_config("paper", {"grad_accum": 2}), 2, None)


def test_unsupported_or_missing_configs_are_refused(tmp_path):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ValueError, match="ZeRO stage 3.*use stage 2"):
        engine_config(build_config("paper", {"ds_config": str(zero3)}), 1, None)
    engine_config(build_config("paper", {"ds_config": str(zero3), "method": "dense"}), 1, None)  # no experts: fine
    broken = tmp_path / "broken.json"
    broken.write_text('{"fp16": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        deepspeed_config.load(str(broken))
    with pytest.raises(ValueError, match="a6000-txl-bf16, cpu"):
        deepspeed_config.load("v100")
