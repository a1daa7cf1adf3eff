"""`smoe train` / `smoe eval` on a CUDA GPU: bf16 resume, a GPU checkpoint evaluated on the CPU,
fp16 + ZeRO-2 with the packaged V100 config, one bf16 step of every method with the packaged
A6000 config, and each rank on its own GPU (a torchrun-style environment; 2 ranks with
ep_size 2 where there are 2 GPUs). Small models (tests/runs.py's SMALL): the time is process
start-up, so independent runs go concurrently."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from smoe.launcher.runtime.distributed import free_port

from runs import DETERMINISTIC, SMALL, SMALL_MLM, scalars

MLM = [*SMALL_MLM, "eval_ks=1,2,4", "log_every=1", "eval_every=100", "save_every=100", "eval_segments=2",
       "warmup_steps=2"]

METHODS = ["dense", "dense-concrete", "dense-dropblock", "smoe-dropout", "smoe-learned", "smoe-learned-increasing-k",
           "thor", "hash", "random"]

# CUDA is not bit-exact from run to run: index_add_, scatter_add_ and the embedding backward use
# float atomics, so two identical runs differ in the last bits of their gradients; in bf16 such a
# bit can flip the rounding of a weight (2^-8 relative), and the losses after it drift by ~1e-4
# relative. 2e-2 relative is far above that noise. lr=1e-2 makes the model learn fast (on CPU the
# loss falls 5.5 -> 4.1 nats by step 5 and 3.4 by step 8, ~5 % a step), so a resume that restarts
# the weights, the optimizer or the lr schedule is off by much more. The exact, bit-for-bit resume
# (data position and RNG streams included) is tested on CPU (tests/launcher/training/test_trainer.py).
BF16_LOSS_RTOL = 2e-2
FAST = ["lr=1e-2"]
# `smoe eval` runs in fp32 on the saved bf16 weights on both devices (TF32 is off by default for
# fp32 matmuls), so GPU and CPU differ only by fp32 summation order (~1e-6 relative) and, at k < N,
# by the rare token whose k-th and (k+1)-th router logits tie to 1e-6 and so picks another expert
# (~1e-4 BPC each on these ~2,000-byte splits). 1e-3 BPC is ten times that and still catches a
# checkpoint that does not load the same weights, or an eval that is not fp32 on one side.
CPU_GPU_BPC_ABS = 1e-3
# The sweep at the end of training runs in bf16 (the training precision); `smoe eval` in fp32:
# loosely the same numbers (a wrong checkpoint is off by whole bits).
BF16_SWEEP_BPC_ABS = 5e-2


def eval_rows(path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def test_bf16_resume_continues_the_losses_and_the_checkpoint_evaluates_the_same_on_cpu(corpus, tmp_path, smoe_gpu,
                                                                                       bf16_config):
    if not smoe_gpu.bf16:
        pytest.skip(smoe_gpu.no_bf16)
    common = ["--preset", "tiny", "--data-file", corpus, *DETERMINISTIC, *FAST, f"ds_config={bf16_config}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = smoe_gpu.run_many({"straight": (["train", "--out", straight, *common], {}),
                               "split": (["train", "--out", split, *common, "--stop-at", "4"], {})})
    for name, result in first.items():
        smoe_gpu.checked(result, f"smoe train ({name})")
    assert (split / "checkpoints" / "latest").read_text() == "step000004"
    resumed = smoe_gpu.run("train", "--out", split, *common, "--resume")
    assert "at step 4" in resumed.stdout, resumed.stdout[-2000:]

    losses = {name: scalars(run, "train/loss") for name, run in (("straight", straight), ("split", split))}
    assert sorted(losses["straight"]) == sorted(losses["split"]) == list(range(1, 9))
    assert all(math.isfinite(v) for v in losses["split"].values()), losses["split"]
    assert losses["split"] == pytest.approx(losses["straight"], rel=BF16_LOSS_RTOL)

    ks = "1,2,4"
    evals = smoe_gpu.run_many({
        "gpu": (["eval", split, "--k", ks, "--json", tmp_path / "gpu.json"], {}),
        "cpu": (["eval", split, "--k", ks, "--json", tmp_path / "cpu.json"], {"env": smoe_gpu.cpu_env()}),
    })
    for name, result in evals.items():
        smoe_gpu.checked(result, f"smoe eval on the {name}")
    gpu, cpu = eval_rows(tmp_path / "gpu.json"), eval_rows(tmp_path / "cpu.json")
    assert [r["k"] for r in gpu] == [r["k"] for r in cpu] == [1, 2, 4]
    for g, c in zip(gpu, cpu):
        for key in ("valid_bpc", "test_bpc"):
            assert math.isfinite(g[key]), (g["k"], key, g[key])
            assert g[key] == pytest.approx(c[key], abs=CPU_GPU_BPC_ABS), f"k={g['k']} {key}: GPU {g[key]}, CPU {c[key]}"
        assert (g["active_params"], g["flops_per_token"]) == (c["active_params"], c["flops_per_token"])
    for row, swept in zip(gpu, eval_rows(split / "eval.json")):
        assert row["valid_bpc"] == pytest.approx(swept["valid_bpc"], abs=BF16_SWEEP_BPC_ABS), row["k"]


def test_fp16_zero2_bert_with_the_packaged_v100_config_survives_overflows(books, tmp_path, smoe_gpu):
    out = tmp_path / "bert"
    # v100x8-bert-fp16 fixes 64 = micro 8 x grad_accum 1 x 8 GPUs: one GPU reaches 64 with grad_accum=8.
    smoe_gpu.run("train", "--preset", "bert-tiny", "--data-files", books, "--out", out, *MLM,
                 "ds_config=v100x8-bert-fp16", "batch_size=64", "grad_accum=8", "max_steps=6")
    loss = scalars(out, "train/loss")
    assert sorted(loss) == list(range(1, 7))
    assert all(math.isfinite(v) for v in loss.values()), loss
    scale, skipped = scalars(out, "train/loss_scale"), scalars(out, "train/skipped_steps")
    assert scale and skipped, "an fp16 run must log train/loss_scale and train/skipped_steps"
    # Dynamic loss scaling from 2^16: powers of two, never above the start, never below min_loss_scale 1.
    assert all(1 <= v <= 2**16 and math.log2(v).is_integer() for v in scale.values()), scale
    assert all(0 <= v <= step for step, v in skipped.items()), skipped  # a running count of skipped updates
    # Steps whose gradients overflowed were skipped, not fatal: the run reached max_steps and its sweep.
    assert (out / "checkpoints" / "latest").read_text() == "step000006"
    rows = eval_rows(out / "eval.json")
    assert [r["k"] for r in rows] == [1, 2, 4] and all(math.isfinite(r["valid_bpc"]) for r in rows)


@pytest.fixture(scope="module")
def one_step_runs(corpus, tmp_path_factory, smoe_gpu):
    """One bf16 step of every method with the packaged A6000 config (22 = micro 22 on one GPU), concurrently."""
    if not smoe_gpu.bf16:
        pytest.skip(smoe_gpu.no_bf16)
    root = tmp_path_factory.mktemp("one-step")
    jobs = {method: (["train", "--preset", "tiny", "--method", method, "--data-file", corpus, "--out", root / method,
                      *SMALL, "batch_size=22", "max_steps=1", "dropblock_size=8", "ds_config=a6000-txl-bf16"], {})
            for method in METHODS}
    return root, smoe_gpu.run_many(jobs)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_bf16_step(method, one_step_runs, smoe_gpu):
    root, results = one_step_runs
    smoe_gpu.checked(results[method], f"smoe train --method {method}")
    loss = scalars(root / method, "train/loss")
    assert list(loss) == [1] and math.isfinite(loss[1]), loss
    rows = eval_rows(root / method / "eval.json")
    expected_ks = [None] if method.startswith("dense") else [1, 2, 4]
    assert [r["k"] for r in rows] == expected_ks
    assert all(math.isfinite(r["valid_bpc"]) and math.isfinite(r["test_bpc"]) for r in rows), rows
    if method == "thor":
        assert scalars(root / method, "train/consistency_loss")


def _check_rank_files(checkpoint, ranks: int, seed: int) -> None:
    """Each rank's file says its model ran on its own GPU: the `random` routers' generators are
    CUDA generators, and dropout (0.1 in `tiny`) drew from the rank's device generator."""
    cpu_state_size = torch.Generator().get_state().numel()
    fresh = {rank: torch.Generator("cuda").manual_seed(seed + rank).get_state() for rank in range(ranks)}
    for rank in range(ranks):
        state = torch.load(checkpoint / f"rank{rank}.pt", map_location="cpu", weights_only=False)
        assert state["generators"] and all(g.numel() != cpu_state_size for g in state["generators"].values()), \
            f"rank {rank}: the random routers' generators were not on the GPU"
        saved = state["cuda"]
        if isinstance(saved, (list, tuple)):  # older files: every visible device; this rank's is LOCAL_RANK's
            drew = [i for i, s in enumerate(saved) if not torch.equal(s, fresh[rank])]
            assert drew == [rank], f"rank {rank}: dropout drew on cuda:{drew}, expected cuda:{rank} only"
        else:  # this rank's own device
            assert not torch.equal(saved, fresh[rank]), f"rank {rank}: its device's RNG never drew: it ran elsewhere"


def test_a_torchrun_environment_trains_on_its_gpu(corpus, tmp_path, smoe_gpu):
    """One rank started the way torchrun starts it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*), on
    the GPU a one-GPU job sees."""
    visible = smoe_gpu.env().get("CUDA_VISIBLE_DEVICES", "").strip()
    env = {"RANK": 0, "LOCAL_RANK": 0, "WORLD_SIZE": 1, "LOCAL_WORLD_SIZE": 1, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": free_port(), "CUDA_VISIBLE_DEVICES": visible.split(",")[0] if visible else "0"}
    out = tmp_path / "run"
    result = smoe_gpu.run("train", "--preset", "tiny", "--method", "random", "--data-file", corpus, "--out", out,
                          *SMALL, "max_steps=2", env=smoe_gpu.env(**env))
    assert "1 rank(s)" in result.stdout
    assert sorted(scalars(out, "train/loss")) == [1, 2]
    _check_rank_files(out / "checkpoints" / "step000002", 1, json.loads((out / "config.json").read_text())["seed"])


def test_two_ranks_on_two_gpus_with_expert_parallelism(corpus, tmp_path, smoe_gpu):
    """DeepSpeed's launcher, 2 ranks (LOCAL_RANK 0 and 1), ep_size 2: experts cross GPUs through
    NCCL all-to-alls, and NCCL refuses two ranks on one GPU. Needs 2 GPUs (the V100 and A100/H100 nodes)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 visible GPUs, this machine shows {torch.cuda.device_count()}")
    out = tmp_path / "ep2"
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port(),
               "--module", "smoe.launcher.cli", "train", "--preset", "tiny", "--method", "random", "--data-file",
               corpus, "--out", out, *SMALL, "max_steps=2", "ep_size=2"]
    result = subprocess.run(list(map(str, command)), env=smoe_gpu.env(), capture_output=True, text=True, timeout=300)
    smoe_gpu.checked(result, "deepspeed --num_gpus 2 ... smoe train ep_size=2")
    assert "2 rank(s), ep_size 2" in result.stdout
    assert sorted(scalars(out, "train/loss")) == [1, 2]
    checkpoint = out / "checkpoints" / "step000002"
    assert len(list(checkpoint.glob("layer_*_expert_*"))) == 2 * 4
    _check_rank_files(checkpoint, 2, json.loads((out / "config.json").read_text())["seed"])
