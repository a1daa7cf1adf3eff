"""What the manifest's checksums cost at the paper's BERT size (`bert-paper`, AdamW): a measurement, not a test.

    DS_ACCELERATOR=cpu python scripts/checkpoint_hashing_cost.py DIR

Builds the model and its DeepSpeed engine on one process, gives AdamW its moments (one step on zero
gradients), then times real saves (:func:`smoe.launcher.checkpoints.save`: DeepSpeed's files, the rank
file, fsync, the manifest) into DIR, alternately as smoe saves (checksums computed while writing, torch's
own record CRCs off) and as before manifests (no checksums, torch's CRCs on), and the time spent in the
checksums inside each save; then, without the disk's noise, torch.save of the weights and AdamW's state
into a sink with torch's CRCs, with the manifest's instead, and with neither. Prints one JSON line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from smoe.launcher.checkpoints import manifest, save
from smoe.launcher.config import build_config
from smoe.launcher.families.masked_lm import build_mlm_model
from smoe.launcher.runtime.distributed import init_distributed
from smoe.launcher.runtime.engine import build_engine, engine_config
from smoe.launcher.training.lr import lr_multiplier
from smoe.model.parallel import init_expert_parallel, optimizer_param_groups

ROUNDS = 5
save_module = importlib.import_module("smoe.launcher.checkpoints.save")  # the package names the function `save`


def main(out: Path) -> None:
    config = build_config("bert-paper", {})
    init_distributed()
    init_expert_parallel(1)
    model = build_mlm_model(config, pad_token_id=0)  # BERT's [PAD]: no tokenizer needed to measure
    engine = build_engine(model, engine_config(config, 1, None), optimizer_param_groups(model, lr=config.lr),
                          lr_multiplier(config), config.weight_decay)
    for p in engine.module.parameters():
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()  # AdamW's moments exist: the optimizer file has its real size
    client = {"step": 1, "world_size": 1, "config": config.to_dict()}
    timings = {"with": [], "without": []}
    update, torch_crcs_off = manifest.Checksum.update, save_module._without_torch_record_crcs
    hashing = []  # seconds spent in Checksum.update during each save with checksums

    def timed_update(self, data):
        start = time.perf_counter()
        update(self, data)
        hashing[-1] += time.perf_counter() - start

    step = 0
    for round_ in range(ROUNDS):
        for kind in ("with", "without") if round_ % 2 == 0 else ("without", "with"):  # neither always first
            # without: no checksums, and torch.save's own record CRCs on, as before manifests
            manifest.Checksum.update = timed_update if kind == "with" else (lambda self, data: None)
            save_module._without_torch_record_crcs = torch_crcs_off if kind == "with" else contextlib.nullcontext
            if kind == "with":
                hashing.append(0.0)
            step += 1
            start = time.perf_counter()
            save(engine, out, step, client, None, keep=1)
            timings[kind].append(time.perf_counter() - start)
    manifest.Checksum.update, save_module._without_torch_record_crcs = update, torch_crcs_off
    with_, without = statistics.median(timings["with"]), statistics.median(timings["without"])
    serialize, serialized_bytes = serialization_times({"module": engine.module.state_dict(),
                                                       "optimizer": engine.optimizer.state_dict()})
    checkpoint_bytes = sum(p.stat().st_size for p in (out / f"step{step:06d}").iterdir())
    print(json.dumps({
        "parameters": sum(p.numel() for p in engine.module.parameters()),
        "checkpoint_bytes": checkpoint_bytes,
        "save_s_with_manifest": [round(t, 2) for t in timings["with"]],
        "save_s_before_manifests": [round(t, 2) for t in timings["without"]],
        "crc32_s_in_save": [round(t, 2) for t in hashing],
        "crc32_share_of_save": round(statistics.median(hashing) / with_, 4),
        "save_time_change": round(with_ / without - 1, 4),
        "serialized_bytes": serialized_bytes,
        "serialize_s": {kind: round(t, 2) for kind, t in serialize.items()},
        # the manifest's CRC less torch's, per byte, over the whole checkpoint, against a save as before
        "net_hashing_share_of_save": round((serialize["manifest_crc"] - serialize["torch_crcs"]) / serialized_bytes
                                           * checkpoint_bytes / without, 4),
    }))


class _Sink:
    """A file that keeps nothing: torch.save's CPU work alone, with or without our checksum."""

    def __init__(self, checksum: manifest.Checksum | None):
        self.checksum, self.bytes = checksum, 0

    def write(self, data) -> int:
        if self.checksum is not None:
            self.checksum.update(data)
        self.bytes += memoryview(data).nbytes
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def serialization_times(state: dict) -> tuple[dict[str, float], int]:
    """Median seconds to torch.save ``state`` (no disk): with torch's record CRCs (as before manifests),
    with the manifest's CRC instead (as smoe saves), and with neither; and the bytes written."""
    kinds = {"torch_crcs": (True, None), "manifest_crc": (False, manifest.Checksum), "neither": (False, None)}
    times = {kind: [] for kind in kinds}
    for _ in range(ROUNDS):
        for kind, (torch_crcs, checksum) in kinds.items():
            torch.serialization.set_crc32_options(torch_crcs)
            sink = _Sink(checksum and checksum())
            start = time.perf_counter()
            torch.save(state, sink)
            times[kind].append(time.perf_counter() - start)
    torch.serialization.set_crc32_options(True)
    return {kind: statistics.median(t) for kind, t in times.items()}, sink.bytes


if __name__ == "__main__":
    main(Path(sys.argv[1]))
