"""`smoe train`: Transformer-XL on enwik8 (or any byte file) on the DeepSpeed engine.

    smoe train --preset tiny --data-file ../shared/data/enwik8/enwik8-head-4154399 --out runs/tiny
    smoe train --preset paper --data-dir data/enwik8 --out runs/paper        # downloads enwik8 if absent
    deepspeed --num_gpus 2 $(which smoe) train --preset tiny --data-file F --out runs/ep2 ep_size=2

Every step: k = schedule(step) is set on every MoE layer, one segment per stream is
read (memory carried over, reset when the data wraps), loss = cross-entropy + the
layers' aux losses (+ THOR's consistency term), DeepSpeed's backward, clip, step.
The run directory holds ``config.json``, ``checkpoints/``, TensorBoard events in
``tb/`` and, at the end, ``eval.json`` with the BPC-vs-k sweep.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.runtime.utils import clip_grad_norm_

from smoe.data import OrderedStream, check_fits, load_corpus
from smoe.routing import TopKSchedule
from smoe.model.transformer_xl import lm_loss

from . import checkpoint
from .build import build_engine, build_model, device, init_distributed
from .config import TrainConfig, check_resume_compatible
from .run_dir import RunDir
from .evaluate import LN2, evaluate, format_header, moe_layers_of, rows_to_json, set_top_k, sweep


class TrainingDiverged(RuntimeError):
    pass


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """THOR's consistency term: KL(a||b) + KL(b||a) per token, averaged (Zuo et al. 2022)."""
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    per_token = ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1)
    return per_token.mean()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Trainer:
    """The loop and its state: engine, streams, schedule, step, Transformer-XL memory."""

    def __init__(self, config: TrainConfig, out_dir: Path, resume: bool = False):
        # Everything that can be refused is checked before any process group or file exists.
        self.paths = RunDir(Path(out_dir))
        self.config = self._check_run_dir(config, resume)
        self.splits = load_corpus(config.data_dir or None, config.data_file or None)
        for split, tokens, batch, seq in (("train", self.splits.train, config.batch_size, config.tgt_len),
                                          ("valid", self.splits.valid, config.eval_batch_size, config.eval_tgt_len),
                                          ("test", self.splits.test, config.eval_batch_size, config.eval_tgt_len)):
            check_fits(len(tokens), batch, seq, split)
        self.rank, self.world = init_distributed()
        self.train_stream = OrderedStream(self.splits.train, config.batch_size, config.tgt_len, self.rank, self.world)
        torch.manual_seed(config.seed + self.rank)  # dropout differs across ranks, reproducibly
        self.device = device()
        model = build_model(config, self.rank).to(self.device)
        self.engine = build_engine(config, model, self.world, self.paths.tensorboard)
        self.schedule = config.k_schedule()
        self.thor = config.method == "thor"
        self.has_experts = bool(moe_layers_of(self.engine.module))
        self.step = 0
        self.mems = None
        if resume:
            self._resume()
        elif self.rank == 0:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(self.paths.config, json.dumps(config.to_dict(), indent=2).encode())

    # --- set-up -------------------------------------------------------------------------------
    def _check_run_dir(self, config: TrainConfig, resume: bool) -> TrainConfig:
        has_run = self.paths.config.is_file()
        if resume:
            if not has_run:
                raise ValueError(f"--resume: {self.paths.root} holds no run (no config.json): "
                                 "drop --resume to start one")
            saved = self.paths.load_config()
            check_resume_compatible(saved, config)
        elif has_run:
            raise ValueError(f"{self.paths.root} already holds a run: pass --resume to continue it, or choose "
                             "another --out (nothing was overwritten)")
        return config

    def _resume(self) -> None:
        client, self.mems = checkpoint.load(self.engine, self.paths.checkpoints, self.device)
        if client["world_size"] != self.world:
            raise ValueError(f"cannot resume: the checkpoint was written by {client['world_size']} ranks and this job "
                             f"has {self.world}; resume with {client['world_size']} ranks (each rank's memory and "
                             "RNG state is saved per rank)")
        self.step = client["step"]
        self.train_stream.load_state_dict(client["data"])
        saved_schedule = TopKSchedule.from_state_dict(client["k_schedule"])
        if saved_schedule != self.schedule and self.rank == 0:
            print(f"note: keeping the checkpoint's k schedule {saved_schedule}, not the config's", flush=True)
        self.schedule = saved_schedule
        if self.rank == 0:
            print(f"resumed {self.paths.root} at step {self.step} (k={self.schedule(self.step)})", flush=True)

    # --- one step ----------------------------------------------------------------------------
    def _losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.engine(inputs, self.mems)
        ce, aux = lm_loss(out.logits, targets), out.aux_loss
        losses = {"ce": ce, "aux": aux, "counts": out.expert_counts}
        if self.thor:
            second = self.engine(inputs, self.mems)
            ce = (ce + lm_loss(second.logits, targets)) / 2
            aux = (aux + second.aux_loss) / 2
            losses.update(ce=ce, aux=aux, consistency=symmetric_kl(out.logits, second.logits))
        losses["total"] = ce + aux + self.config.consistency_coef * losses.get("consistency", 0.0)
        self.mems = out.mems
        return losses

    def train_step(self) -> dict:
        k = self.schedule(self.step)
        set_top_k(self.engine.module, k)
        segment = self.train_stream.next_segment()
        if segment.new_epoch:
            self.mems = None
        losses = self._losses(segment.inputs.to(self.device), segment.targets.to(self.device))
        # The same reduced value on every rank, so a NaN stops all of them at the same step.
        reduced = torch.stack([losses["ce"].detach().float(), losses["aux"].detach().float()])
        dist.all_reduce(reduced)
        reduced /= self.world
        if not torch.isfinite(reduced).all():
            tag = checkpoint.latest_tag(self.paths.checkpoints)
            raise TrainingDiverged(f"loss is {reduced[0].item()} at step {self.step + 1} (k={k}): training stopped. "
                                   f"The last good checkpoint is {tag or 'none'} in {self.paths.checkpoints}; "
                                   "lower lr or clip and continue with --resume")
        self.engine.backward(losses["total"])
        grad_norm = clip_grad_norm_(self.engine.module.parameters(), self.config.clip) if self.config.clip else None
        self.engine.step()
        self.step += 1
        return {"k": k, "ce": reduced[0].item(), "aux": reduced[1].item(), "counts": losses["counts"],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "consistency": float(losses["consistency"]) if "consistency" in losses else None}

    # --- the loop ----------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> None:
        config = self.config
        end = min(stop_at or config.max_steps, config.max_steps)
        tokens_per_step = config.batch_size * config.tgt_len
        window = _Window()
        if self.rank == 0:
            print(f"training {config.method} ({config.preset}) on {self.splits.source}: steps {self.step}->{end}, "
                  f"{self.world} rank(s), ep_size {config.ep_size}, {tokens_per_step:,} tokens/step", flush=True)
        while self.step < end:
            started = time.perf_counter()
            stats = self.train_step()
            window.add(stats, time.perf_counter() - started)
            if self.step % config.log_every == 0 or self.step == end:
                self._log(window, tokens_per_step, end)
                window = _Window()
            if self.step % config.eval_every == 0 or self.step == config.max_steps:
                self._validate()
            if self.step % config.save_every == 0 or self.step == end:
                self.save()
        if self.step == config.max_steps:
            self.final_sweep()

    def save(self) -> str:
        client = {"step": self.step, "world_size": self.world, "data": self.train_stream.state_dict(),
                  "k_schedule": self.schedule.state_dict(), "config": self.config.to_dict()}
        return checkpoint.save(self.engine, self.paths.checkpoints, self.step, client, self.mems,
                               self.config.keep_checkpoints)

    def _log(self, window: "_Window", tokens_per_step: int, end: int) -> None:
        counts = window.counts
        if counts is not None:
            counts = counts.to(self.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        if self.rank != 0:
            return
        ce = window.mean("ce")
        step_time = window.seconds / window.steps
        events = [("train/loss", ce, self.step), ("train/bpc", ce / LN2, self.step),
                  ("train/aux_loss", window.mean("aux"), self.step),
                  ("train/lr", self.engine.get_lr()[0], self.step),
                  ("train/tokens_per_s", tokens_per_step / step_time, self.step),
                  ("train/step_time_s", step_time, self.step)]
        if self.has_experts:
            events.append(("moe/top_k", window.last["k"], self.step))
        if window.last["grad_norm"] is not None:
            events.append(("train/grad_norm", window.mean("grad_norm"), self.step))
        if window.last["consistency"] is not None:
            events.append(("train/consistency_loss", window.mean("consistency"), self.step))
        for layer, layer_counts in enumerate(counts if counts is not None else []):
            share = layer_counts / layer_counts.sum().clamp_min(1)
            events += [(f"moe/layer{layer}/max_share", share.max().item(), self.step),
                       (f"moe/layer{layer}/min_share", share.min().item(), self.step),
                       (f"moe/layer{layer}/dead_experts", int((layer_counts == 0).sum()), self.step)]
        self.engine.monitor.write_events(events)
        eta = format_duration((end - self.step) * step_time)
        k = f"k {window.last['k']} | " if self.has_experts else ""
        print(f"step {self.step}/{end} | loss {ce:.4f} | bpc {ce / LN2:.4f} | {k}"
              f"{tokens_per_step / step_time:,.0f} tok/s | {step_time:.3f} s/step | ETA {eta}", flush=True)

    def _validate(self) -> None:
        stream = OrderedStream(self.splits.valid, self.config.eval_batch_size, self.config.eval_tgt_len,
                               self.rank, self.world, name="valid")
        loss = evaluate(self.engine.module, stream, self.config.eval_mem_len, self.config.eval_segments)
        if self.rank == 0:
            self.engine.monitor.write_events([("val/loss", loss, self.step), ("val/bpc", loss / LN2, self.step)])
            k = f" (k={self.schedule(self.step)})" if self.has_experts else ""
            print(f"step {self.step} | valid bpc {loss / LN2:.4f}{k}", flush=True)

    def final_sweep(self) -> list:
        """BPC on the whole validation and test splits at every k in ``eval_ks``."""
        config = self.config
        streams = [OrderedStream(split, config.eval_batch_size, config.eval_tgt_len, self.rank, self.world, name=name)
                   for name, split in (("valid", self.splits.valid), ("test", self.splits.test))]
        say = print if self.rank == 0 else (lambda *_: None)
        say(f"BPC by k on {self.splits.source} (valid and test splits)\n{format_header()}")
        rows = sweep(self.engine.module, list(config.eval_ks), *streams, seq_len=config.eval_tgt_len,
                     mem_len=config.eval_mem_len, vocab_size=config.vocab_size, log=say)
        if self.rank == 0:
            report = {"source": self.splits.source, "step": self.step, "method": config.method, "rows": rows_to_json(rows)}
            checkpoint.write_atomic(self.paths.eval, json.dumps(report, indent=2).encode())
        return rows


class _Window:
    """Running sums of the steps since the last log line."""

    def __init__(self):
        self.steps = 0
        self.seconds = 0.0
        self.sums: dict[str, float] = {}
        self.counts = None
        self.last: dict = {}

    def add(self, stats: dict, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.last = stats
        for key in ("ce", "aux", "grad_norm", "consistency"):
            if stats[key] is not None:
                self.sums[key] = self.sums.get(key, 0.0) + stats[key]
        layer_counts = [c for c in stats["counts"] if c is not None]
        if layer_counts:
            stacked = torch.stack([c.detach().cpu().double() for c in layer_counts])
            self.counts = stacked if self.counts is None else self.counts + stacked

    def mean(self, key: str) -> float:
        return self.sums.get(key, math.nan) / max(self.steps, 1)
