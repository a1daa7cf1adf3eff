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

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import NamedTuple

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.runtime.utils import clip_grad_norm_

from smoe.data import OrderedStream, check_fits, load_corpus
from smoe.routing import TopKSchedule
from smoe.model.feedforward import get_method
from smoe.model.moe import moe_layers_of, set_top_k
from smoe.model.parallel import init_expert_parallel
from smoe.model.transformer_xl import lm_loss

from . import checkpoint, deepspeed_config
from .build import any_rank, build_engine, build_model, engine_config, init_distributed
from .config import TrainConfig, check_resume_compatible
from .files import write_atomic
from .run_dir import RunDir, RunDirLocked, WriterLock
from .evaluate import LN2, evaluate, flops_per_token, format_header, rows_to_json, sweep


class TrainingDiverged(RuntimeError):
    pass


class OverflowGuard:
    """When a non-finite loss stops the run.

    Under fp16, DeepSpeed's loss scaler skips the update of a step whose gradients overflow
    and lowers the scale, so a transient non-finite loss (an fp16 forward overflow) is survived
    the same way, up to ``patience`` steps in a row. In bf16 or fp32 nothing would recover:
    the first non-finite loss stops the run."""

    def __init__(self, ds: dict, patience: int):
        self.loss_scaled = bool(ds.get("fp16", {}).get("enabled"))
        self.patience = patience if self.loss_scaled else 0
        self.in_a_row = 0

    def check(self, ce: float, aux: float, step: int, k: int, ckpt_dir: Path) -> None:
        if math.isfinite(ce) and math.isfinite(aux):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row > self.patience:
            tag = checkpoint.latest_tag(ckpt_dir)
            streak = f", {self.in_a_row} steps in a row (overflow_patience={self.patience})" if self.patience else ""
            raise TrainingDiverged(f"loss is {ce} at step {step} (k={k}{streak}): training stopped. "
                                   f"The last good checkpoint is {tag or 'none'} in {ckpt_dir}; "
                                   "lower lr or clip and continue with --resume")


def loss_scale(engine) -> float:
    """The fp16 loss scale of DeepSpeed's optimizer (ZeRO's keeps it in a LossScaleConfig)."""
    optimizer = engine.optimizer
    return float(getattr(getattr(optimizer, "loss_scale_config", optimizer), "cur_scale"))


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


class Pass(NamedTuple):
    """One forward pass over a micro-batch, as the loss needs it."""

    ce: torch.Tensor
    aux: torch.Tensor  # the layers' auxiliary losses
    counts: list  # per layer: tokens per expert (None for a dense layer)
    logits: torch.Tensor  # for THOR's consistency term
    scored: torch.Tensor | None = None  # where the loss is read (masked-LM's masked tokens); None: everywhere


def micro_batch_losses(first: Pass, second: Pass | None, consistency_coef: float) -> dict:
    """Cross-entropy + aux of one pass; with a second pass (THOR: each draws its own experts),
    the two passes' mean + ``consistency_coef`` x their symmetric KL."""
    if second is None:
        return {"ce": first.ce, "aux": first.aux, "counts": first.counts, "total": first.ce + first.aux}
    ce, aux = (first.ce + second.ce) / 2, (first.aux + second.aux) / 2
    if first.scored is None:
        consistency = symmetric_kl(first.logits, second.logits)
    else:  # boolean indexing reads the count back: only THOR pays for it
        consistency = symmetric_kl(first.logits[first.scored], second.logits[first.scored])
    return {"ce": ce, "aux": aux, "counts": first.counts, "consistency": consistency,
            "total": ce + aux + consistency_coef * consistency}


class Trainer:
    """The loop and its state: engine, streams, schedule, step, Transformer-XL memory."""

    def __init__(self, config: TrainConfig, out_dir: Path, resume: bool = False, fresh_ok: bool = False):
        """``fresh_ok``: starting over in a run directory that has no checkpoint yet is allowed
        (a batch job killed before its first save)."""
        # Everything that can be refused is checked before any process group or file exists.
        self.paths = RunDir(Path(out_dir))
        self.config = config = self._check_run_dir(config, resume, fresh_ok)
        self._load_data()
        self.rank, self.world = init_distributed()
        # Refused on the real world size before the run is locked or written: a DeepSpeed config or
        # batch layout that does not fit, an ep_size that does not divide the ranks.
        ds = engine_config(config, self.world, self.paths.tensorboard)
        init_expert_parallel(config.ep_size)
        self.writer = WriterLock(self.paths)
        self._lock_run_dir()
        self.train_stream = self._train_stream()
        torch.manual_seed(config.seed + self.rank)  # dropout differs across ranks, reproducibly
        self.engine = build_engine(config, self._build_model(), ds)
        self.device = self.engine.device  # this rank's device: DeepSpeed placed the model there
        self.schedule = config.k_schedule()
        self.two_passes = get_method(config.method).consistency  # THOR's consistency term
        self.has_experts = bool(moe_layers_of(self.engine.module))
        self.optimizer_wrapped = deepspeed_config.wraps_optimizer(self.engine.config)
        self.overflows = OverflowGuard(self.engine.config, config.overflow_patience)
        self._signal: int | None = None  # set by a stop signal (Slurm's warning before preemption)
        self.stopped_by_signal: str | None = None
        self.step = 0
        self.mems = None
        if resume:
            self._resume()
        if self.rank == 0:  # the config in effect (a resume may change ep_size and non-shape fields)
            self.paths.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.paths.config, json.dumps(config.to_dict(), indent=2).encode())

    # --- set-up -------------------------------------------------------------------------------
    def _check_run_dir(self, config: TrainConfig, resume: bool, fresh_ok: bool) -> TrainConfig:
        has_run = self.paths.config.is_file()
        if resume:
            if not has_run:
                raise ValueError(f"--resume: {self.paths.root} holds no run (no config.json): "
                                 "drop --resume to start one")
            saved = self.paths.load_config()
            check_resume_compatible(saved, config)
            if not config.ds_config:  # the precision and ZeRO stage the run was trained with
                config = dataclasses.replace(config, ds_config=saved.ds_config)
        elif has_run and not fresh_ok:
            raise ValueError(f"{self.paths.root} already holds a run: pass --resume to continue it, or choose "
                             "another --out (nothing was overwritten)")
        return dataclasses.replace(config, ds_config=config.ds_config or deepspeed_config.DEFAULT)

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run directory's writer lock, before anything of the run is written, and
        every rank learns the outcome: a refused job stops on all its ranks at once."""
        refused, note = None, None
        if self.rank == 0:
            try:
                note = self.writer.acquire()
            except RunDirLocked as error:
                refused = error
        if note:
            print(note, flush=True)
        if any_rank(refused is not None):
            raise refused or RunDirLocked(f"{self.paths.root} is being written by another process: see rank 0's "
                                          "message")

    def _resume(self) -> None:
        client, self.mems = checkpoint.load(self.engine, self.paths.checkpoints, self.device, self.config.ep_size,
                                            self.config.seed)
        self.step = client["step"]
        self.train_stream.load_state_dict(client["data"])
        saved_schedule = TopKSchedule.from_state_dict(client["k_schedule"])
        if saved_schedule != self.schedule and self.rank == 0:
            print(f"note: keeping the checkpoint's k schedule {saved_schedule}, not the config's", flush=True)
        self.schedule = saved_schedule
        if self.rank == 0:
            print(f"resumed {self.paths.root} at step {self.step} (k={self.schedule(self.step)})", flush=True)

    # --- the task: Transformer-XL on a byte corpus (MaskedLMTrainer overrides this part) --------
    unit = "BPC"

    @property
    def source(self) -> str:
        return self.splits.source

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.tgt_len

    def _load_data(self) -> None:
        config = self.config
        self.splits = load_corpus(config.data_dir or None, config.data_file or None)
        for split, tokens, batch, seq in (("train", self.splits.train, config.batch_size, config.tgt_len),
                                          ("valid", self.splits.valid, config.eval_batch_size, config.eval_tgt_len),
                                          ("test", self.splits.test, config.eval_batch_size, config.eval_tgt_len)):
            check_fits(len(tokens), batch, seq, split)

    def _train_stream(self):
        return OrderedStream(self.splits.train, self.config.batch_size, self.config.tgt_len, self.rank, self.world)

    def _build_model(self) -> torch.nn.Module:
        return build_model(self.config, self.rank)

    def _next_batch(self):
        segment = self.train_stream.next_segment()
        if segment.new_epoch:
            self.mems = None
        return segment

    def _micro_batches(self, segment):
        """This rank's rows of the segment cut into ``grad_accum`` micro-batches, each with its rows' memory."""
        accum = self.config.grad_accum
        mems = [None] * accum if self.mems is None else list(zip(*(m.chunk(accum) for m in self.mems)))
        return zip(zip(segment.inputs.chunk(accum), segment.targets.chunk(accum)), mems)

    def _forward(self, micro_batch, mems) -> tuple[Pass, list]:
        inputs, targets = (t.to(self.device, non_blocking=True) for t in micro_batch)
        out = self.engine(inputs, mems)
        return Pass(lm_loss(out.logits, targets), out.aux_loss, out.expert_counts, out.logits), out.mems

    def _carry(self, states: list) -> None:
        """What the micro-batches leave for the next step: Transformer-XL's memory rows."""
        self.mems = [torch.cat(layer, dim=0) for layer in zip(*states)]

    def _eval_stream(self, split: str) -> OrderedStream:
        tokens = {"valid": self.splits.valid, "test": self.splits.test}[split]
        return OrderedStream(tokens, self.config.eval_batch_size, self.config.eval_tgt_len, self.rank, self.world,
                             name=split)

    def _eval_loss(self, split: str, max_batches: int = 0) -> float:
        return evaluate(self.engine.module, self._eval_stream(split), self.config.eval_mem_len, max_batches)

    def _flops_per_token(self) -> float:
        config = self.config
        return flops_per_token(self.engine.module, config.eval_tgt_len, config.eval_mem_len, config.vocab_size)

    # --- one step ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step. Losses and expert counts stay on the device; the one host sync is
        the read-back of the all-reduced losses and stop flag."""
        k = self.schedule(self.step)
        set_top_k(self.engine.module, k)
        batch = self._next_batch()
        sums = torch.zeros(3, device=self.device)  # ce, aux, THOR consistency: summed over micro-batches
        counts, states = None, []
        for micro, (micro_batch, state) in enumerate(self._micro_batches(batch)):
            if micro:
                self.engine.step()  # DeepSpeed counts micro-steps and updates only at the last one
            first, next_state = self._forward(micro_batch, state)
            second = self._forward(micro_batch, state)[0] if self.two_passes else None
            losses, state = micro_batch_losses(first, second, self.config.consistency_coef), next_state
            self.engine.backward(losses["total"])
            sums += torch.stack([losses[key].detach().float() if key in losses else sums.new_zeros(())
                                 for key in ("ce", "aux", "consistency")])
            layer_counts = [c for c in losses["counts"] if c is not None]
            counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
            states.append(state)
        self._carry(states)
        # The same reduced values on every rank, so that all of them stop at the same step on a NaN
        # or on a signal that reached any one of them.
        stop_flag = torch.full((1,), float(self._signal is not None), device=self.device)
        reduced = torch.cat([sums / (self.config.grad_accum * self.world), stop_flag])
        dist.all_reduce(reduced)
        ce, aux, consistency, stop = reduced.tolist()
        self.overflows.check(ce, aux, self.step + 1, k, self.paths.checkpoints)
        clip_here = self.config.clip and not self.optimizer_wrapped
        grad_norm = clip_grad_norm_(self.engine.module.parameters(), self.config.clip) if clip_here else None
        self.engine.step()
        if not self.engine.was_step_applied():
            # fp16 overflow: DeepSpeed skipped the update and its lr step; every schedule (lr and k)
            # and the checkpoints follow self.step, the batches consumed, so the lr moves on too.
            self.engine.lr_scheduler.step()
        elif self.optimizer_wrapped:
            grad_norm = self.engine.get_global_grad_norm()
        self.step += 1
        return {"k": k, "ce": ce, "aux": aux, "counts": counts, "stop": stop > 0,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "consistency": consistency if self.two_passes else None}

    # --- the loop ----------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> None:
        """Train to ``stop_at`` (default ``max_steps``). SIGUSR1 or SIGTERM (Slurm sends one before a
        time limit or preemption) ends the current step, saves a checkpoint and returns with
        ``stopped_by_signal`` set, so that the job can requeue itself and resume exactly there."""
        config = self.config
        end = min(stop_at or config.max_steps, config.max_steps)
        tokens_per_step = self.tokens_per_step
        window = _Window()
        if self.rank == 0:
            print(f"training {config.method} ({config.preset}) on {self.source}: steps {self.step}->{end}, "
                  f"{self.world} rank(s), ep_size {config.ep_size}, {tokens_per_step:,} tokens/step", flush=True)
        try:
            with _StopSignals(self):
                while self.step < end:
                    started = time.perf_counter()
                    stats = self.train_step()
                    window.add(stats, time.perf_counter() - started)
                    if self.step % config.log_every == 0 or self.step == end or stats["stop"]:
                        self._log(window, tokens_per_step, end)
                        window = _Window()
                    if self.step % config.eval_every == 0 or self.step == config.max_steps:
                        self._validate()
                    if self.step % config.save_every == 0 or self.step == end or stats["stop"]:
                        tag = self.save()
                    if stats["stop"]:
                        self.stopped_by_signal = signal.Signals(self._signal).name if self._signal else "a peer rank"
                        if self.rank == 0:
                            print(f"stopped by {self.stopped_by_signal} after step {self.step}: checkpoint {tag} "
                                  "saved; continue with --resume (the slurm/ scripts requeue and resume)", flush=True)
                        return
            if self.step == config.max_steps:
                self.final_sweep()
        finally:
            self.writer.release()  # the run directory is free for the next writer

    def save(self) -> str:
        client = {"step": self.step, "world_size": self.world, "data": self.train_stream.state_dict(),
                  "k_schedule": self.schedule.state_dict(), "config": self.config.to_dict(),
                  "optimizer_kind": deepspeed_config.optimizer_kind(self.engine.config)}
        return checkpoint.save(self.engine, self.paths.checkpoints, self.step, client, self.mems,
                               self.config.keep_checkpoints)

    def _log(self, window: "_Window", tokens_per_step: int, end: int) -> None:
        """Rank 0 prints and writes TensorBoard events: losses are already averaged over ranks, and
        tokens/s is the sum of every rank's own rate."""
        local_tokens = tokens_per_step // self.world * window.steps
        tokens_per_s = torch.tensor([local_tokens / window.seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(tokens_per_s)
        counts = window.counts
        if counts is not None:
            dist.all_reduce(counts)
            counts = counts.cpu()
        if self.rank != 0:
            return
        ce = window.mean("ce")
        tokens_per_s = tokens_per_s.item()
        step_time = window.seconds / window.steps
        events = [("train/loss", ce, self.step), ("train/bpc", ce / LN2, self.step),
                  ("train/aux_loss", window.mean("aux"), self.step),
                  ("train/lr", self.engine.get_lr()[0], self.step),
                  ("train/tokens_per_s", tokens_per_s, self.step),
                  ("train/step_time_s", step_time, self.step)]
        if self.has_experts:
            events.append(("moe/top_k", window.last["k"], self.step))
        if window.last["grad_norm"] is not None:
            events.append(("train/grad_norm", window.mean("grad_norm"), self.step))
        if window.last["consistency"] is not None:
            events.append(("train/consistency_loss", window.mean("consistency"), self.step))
        if self.overflows.loss_scaled:
            events += [("train/loss_scale", loss_scale(self.engine), self.step),
                       ("train/skipped_steps", self.engine.skipped_steps, self.step)]
        for layer, layer_counts in enumerate(counts if counts is not None else []):
            share = layer_counts / layer_counts.sum().clamp_min(1)
            events += [(f"moe/layer{layer}/max_share", share.max().item(), self.step),
                       (f"moe/layer{layer}/min_share", share.min().item(), self.step),
                       (f"moe/layer{layer}/dead_experts", int((layer_counts == 0).sum()), self.step)]
        self.engine.monitor.write_events(events)
        eta = format_duration((end - self.step) * step_time)
        k = f"k {window.last['k']} | " if self.has_experts else ""
        print(f"step {self.step}/{end} | loss {ce:.4f} | {self.unit.lower()} {ce / LN2:.4f} | {k}"
              f"{tokens_per_s:,.0f} tok/s | {step_time:.3f} s/step | ETA {eta}", flush=True)

    def _validate(self) -> None:
        loss = self._eval_loss("valid", self.config.eval_segments)
        if self.rank == 0:
            self.engine.monitor.write_events([("val/loss", loss, self.step), ("val/bpc", loss / LN2, self.step)])
            k = f" (k={self.schedule(self.step)})" if self.has_experts else ""
            print(f"step {self.step} | valid {self.unit} {loss / LN2:.4f}{k}", flush=True)

    def final_sweep(self) -> list:
        """The validation and test splits at every k in ``eval_ks``: bits per token, active parameters, FLOPs."""
        say = print if self.rank == 0 else (lambda *_: None)
        say(f"{self.unit} by k on {self.source} (valid and test splits)\n{format_header(self.unit)}")
        rows = sweep(self.engine.module, list(self.config.eval_ks), lambda: self._eval_loss("valid"),
                     lambda: self._eval_loss("test"), self._flops_per_token, log=say)
        if self.rank == 0:
            report = {"source": self.source, "step": self.step, "method": self.config.method, "unit": self.unit,
                      "rows": rows_to_json(rows)}
            write_atomic(self.paths.eval, json.dumps(report, indent=2).encode())
        return rows


class _StopSignals:
    """While training, SIGUSR1 and SIGTERM ask for a checkpoint and a clean stop instead of killing."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.trainer._signal = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class _Window:
    """Running sums of the steps since the last log line."""

    def __init__(self):
        self.steps = 0
        self.finite_steps = 0
        self.seconds = 0.0
        self.sums: dict[str, float] = {}
        self.counts = None
        self.last: dict = {}

    def add(self, stats: dict, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.last = stats
        if not math.isfinite(stats["ce"]):  # an fp16 overflow DeepSpeed skipped: not part of the means
            return
        self.finite_steps += 1
        for key in ("ce", "aux", "grad_norm", "consistency"):
            if stats[key] is not None:
                self.sums[key] = self.sums.get(key, 0.0) + stats[key]
        layer_counts = [c for c in stats["counts"] if c is not None]
        if layer_counts:  # summed on the device: read back only when logged
            stacked = torch.stack([c.detach().double() for c in layer_counts])
            self.counts = stacked if self.counts is None else self.counts + stacked

    def mean(self, key: str) -> float:
        return self.sums.get(key, math.nan) / self.finite_steps if self.finite_steps else math.nan
