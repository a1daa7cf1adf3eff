"""Masked-LM evaluation on the GPU draws nothing from the training RNG streams.

Validation runs in the middle of training: if it reseeded or advanced the CUDA generator, the
dropout masks after a validation would differ from a run without one (and, seeded alike, every
rank would get the same masks). Its masks come from a seeded, restored CPU generator."""

from __future__ import annotations

import math

import torch

from smoe.launcher.config import build_config, parse_override

from runs import SMALL_MLM

MLM = [*SMALL_MLM, "batch_size=8", "eval_ks=1,2,4"]


def test_masked_lm_evaluation_leaves_the_cuda_rng_alone(books, tmp_path):
    from smoe.launcher.families.masked_lm import build_mlm_model
    from smoe.launcher.families.text import TextData

    overrides = dict(parse_override(o) for o in MLM)
    config = build_config("bert-tiny", {**overrides, "data_files": (str(books),), "cache_dir": str(tmp_path / "cache")})
    data = TextData(config, tmp_path)
    device = torch.device("cuda", torch.cuda.current_device())
    model = build_mlm_model(config, data.tokenizer.pad_token_id).to(device).train()

    torch.cuda.manual_seed(12345)  # a state that no reseed with the config's seed gives back
    torch.rand(1000, device=device)
    cuda_before, cpu_before = torch.cuda.get_rng_state(device), torch.get_rng_state()
    loss = data.eval_loss(model, "valid", 0, 1, device)
    assert math.isfinite(loss) and loss > 0
    assert torch.equal(torch.cuda.get_rng_state(device), cuda_before), \
        "masked-LM evaluation changed the CUDA RNG (reseeded or drew from it): training's dropout would change"
    assert torch.equal(torch.get_rng_state(), cpu_before), "masked-LM evaluation did not restore the CPU RNG"
    assert model.training  # eval_loss puts the mode back
