"""DeepSpeed JSON configs (``ds_configs/``) and how a run's batch fits them.

A run names its config with ``ds_config=NAME`` (a file in ``ds_configs/``) or
``ds_config=PATH.json``. The run's ``batch_size`` (global, sequences per optimizer
step) and ``grad_accum`` decide the micro batch of each rank::

    batch_size = micro_batch x grad_accum x data-parallel ranks

Every rank is a data-parallel rank for the shared weights, expert-parallel or not, so
the data-parallel size is the world size. Batch keys written in the JSON describe the
setup the file is for (the paper's 8 x V100 runs: 64 = 8 x 1 x 8); they must agree
with the run, and a mismatch is an error that names the value to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

# JSON keys that this module owns: the run's batch fills them in.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
DEFAULT = "cpu"  # what a new run uses when it names none (a resumed run keeps its own)


def packaged() -> list[str]:
    return sorted(p.name[:-5] for p in (files("smoe") / "ds_configs").iterdir() if p.name.endswith(".json"))


def load(name: str) -> tuple[dict, str]:
    """The JSON for a packaged name or a path (empty: :data:`DEFAULT`), and where it came from (for messages)."""
    name = name or DEFAULT
    path = Path(name) if name.endswith(".json") else files("smoe") / "ds_configs" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"DeepSpeed config '{name}' not found ({path}): use a path to a .json file or one of "
                         f"{', '.join(packaged())}")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as error:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({error}): fix the file") from None


@dataclass(frozen=True)
class BatchLayout:
    batch_size: int  # global sequences per optimizer step
    micro_batch: int  # sequences per rank per forward/backward
    grad_accum: int
    data_parallel: int

    def as_deepspeed(self) -> dict:
        return {"train_batch_size": self.batch_size, "train_micro_batch_size_per_gpu": self.micro_batch,
                "gradient_accumulation_steps": self.grad_accum}


def batch_layout(batch_size: int, grad_accum: int, world_size: int, ds: dict, source: str) -> BatchLayout:
    """Split the global batch over ranks and accumulation steps, checked against the JSON."""
    ranks_x_accum = world_size * grad_accum
    if batch_size % ranks_x_accum:
        raise ValueError(f"batch_size ({batch_size}) must be micro_batch x grad_accum ({grad_accum}) x data-parallel "
                         f"ranks ({world_size}), but {batch_size} is not divisible by {ranks_x_accum}: use a "
                         f"batch_size that is a multiple of {ranks_x_accum}, or change grad_accum")
    layout = BatchLayout(batch_size, batch_size // ranks_x_accum, grad_accum, world_size)
    fixes = {"train_batch_size": f"batch_size={ds.get('train_batch_size')}",
             "train_micro_batch_size_per_gpu": _accum_fix(batch_size, world_size, ds.get("train_micro_batch_size_per_gpu")),
             "gradient_accumulation_steps": f"grad_accum={ds.get('gradient_accumulation_steps')}"}
    for key, expected in layout.as_deepspeed().items():
        if key in ds and ds[key] != expected:
            raise ValueError(f"{source} sets {key}={ds[key]}, but this run has {key}={expected} (batch_size "
                             f"{batch_size} = micro {layout.micro_batch} x grad_accum {grad_accum} x {world_size} "
                             f"ranks): use {fixes[key]}, or another ds_config")
    return layout


def _accum_fix(batch_size: int, world_size: int, micro: int | None) -> str:
    if micro and batch_size % (world_size * micro) == 0:
        return f"grad_accum={batch_size // (world_size * micro)}"
    return f"a batch_size that is a multiple of micro x {world_size} ranks"


def check_supported(ds: dict, source: str, has_experts: bool) -> None:
    """Refuse what DeepSpeed's native MoE cannot do, before DeepSpeed asserts deep inside."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if has_experts and stage == 3:
        raise ValueError(f"{source} asks for ZeRO stage 3, which DeepSpeed's MoE layers do not support: use stage 2 "
                         "(gradients and optimizer states partitioned; experts over their expert-data-parallel "
                         "group) or stage 1")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ValueError(f"{source} enables both fp16 and bf16: enable one")


def optimizer_kind(ds: dict) -> str:
    """What DeepSpeed makes of the optimizer, e.g. "bf16, ZeRO stage 2". Its saved states load only
    into an engine of the same kind (a plain fp32 optimizer's have other keys than a wrapped one's)."""
    precision = next((name for name in ("fp16", "bf16") if ds.get(name, {}).get("enabled")), "fp32")
    return f"{precision}, ZeRO stage {ds.get('zero_optimization', {}).get('stage', 0)}"


def engine_json(name: str, batch_size: int, grad_accum: int, world_size: int, *, clip: float, has_experts: bool,
                tensorboard_dir: Path | None = None, training: bool = True) -> dict:
    """The DeepSpeed JSON ``name``, filled in with a run's batch layout, clipping and TensorBoard
    monitor. Evaluation has no training batch, so it runs on any number of ranks, and it runs in
    fp32 on the saved (possibly bf16) weights."""
    ds, source = load(name)
    check_supported(ds, source, has_experts)
    if training:
        layout = batch_layout(batch_size, grad_accum, world_size, ds, source)
    else:  # fp32 weights and no optimizer: nothing for ZeRO or a mixed-precision wrapper to manage
        layout = BatchLayout(world_size, 1, 1, world_size)
        ds = {key: value for key, value in ds.items() if key not in ("fp16", "bf16", "zero_optimization")}
    # A wrapped optimizer (fp16, bf16, ZeRO) clips inside DeepSpeed; a plain one is clipped by the loop,
    # which also needs the norm for logging.
    ds = {**ds, **layout.as_deepspeed(), "gradient_clipping": clip if wraps_optimizer(ds) else 0.0,
          "steps_per_print": 2**31 - 1}
    if tensorboard_dir is not None:
        ds["tensorboard"] = {"enabled": True, "output_path": str(tensorboard_dir.parent),
                             "job_name": tensorboard_dir.name}
    return ds


def wraps_optimizer(ds: dict) -> bool:
    """Whether DeepSpeed wraps the optimizer (fp16, bf16 or ZeRO) and so clips gradients itself."""
    return bool(ds.get("fp16", {}).get("enabled") or ds.get("bf16", {}).get("enabled")
                or ds.get("zero_optimization", {}).get("stage", 0) > 0)
