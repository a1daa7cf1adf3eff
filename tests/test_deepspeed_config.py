"""The packaged DeepSpeed configs and the batch arithmetic that must agree with them."""

from __future__ import annotations

import pytest

from smoe.launcher import deepspeed_config
from smoe.launcher.build import engine_config
from smoe.launcher.config import build_config


@pytest.mark.parametrize("name", deepspeed_config.packaged())
def test_every_packaged_config_loads_and_is_supported_with_experts(name):
    ds, source = deepspeed_config.load(name)
    deepspeed_config.check_supported(ds, source, has_experts=True)


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
