"""`smoe train`: the loop, on the DeepSpeed engine, for any model family.

    smoe train --preset tiny --data-file ../shared/data/enwik8/enwik8-head-4154399 --out runs/tiny
    smoe train --preset paper --data-dir data/enwik8 --out runs/paper        # downloads enwik8 if absent
    smoe train --preset bert-tiny --data-files ../shared/data/books --out runs/bert-tiny
    deepspeed --num_gpus 2 $(which smoe) train --preset tiny --data-file F --out runs/ep2 ep_size=2

Every step: k = schedule(step) is set on every MoE layer (``k_sampling=per-layer``: each layer
its own draw from k_min..k), the family gives the step's micro-batches (Transformer-XL: one
segment per stream, memory carried over and reset when the data wraps; masked-LM: a shuffled
batch of masked blocks), loss = cross-entropy + the layers' aux losses (+ THOR's consistency
term), DeepSpeed's backward, clip, step. The run directory holds ``config.json``,
``checkpoints/``, TensorBoard events in ``tb/`` and, at the end, ``eval.json`` with the sweep
by k.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import deepspeed.comm as dist
import torch
from deepspeed.runtime.utils import clip_grad_norm_

from smoe.launcher import checkpoints
from smoe.launcher.checkpoints.run_dir import RunDir, RunDirLocked, WriterLock
from smoe.launcher.checkpoints.schema import ClientState
from smoe.launcher.config import TrainConfig, check_resume_compatible
from smoe.launcher.evaluation.metrics import LN2
from smoe.launcher.evaluation.sweep import format_header, rows_to_json, sweep
from smoe.launcher.families import family_of
from smoe.launcher.runtime import deepspeed_config
from smoe.launcher.runtime import log
from smoe.launcher.runtime.distributed import any_rank, init_distributed
from smoe.launcher.runtime.engine import build_engine, engine_config
from smoe.launcher.runtime.files import write_atomic
from smoe.launcher.training.losses import OverflowGuard, loss_scale, micro_batch_losses
from smoe.launcher.training.lr import lr_multiplier
from smoe.launcher.training.progress import Window, format_duration, peak_memory_mb
from smoe.model.autotune import autotune_dispatch, set_auto_paths
from smoe.model.feedforward import get_method
from smoe.model.moe import moe_layers_of, set_top_k
from smoe.model.parallel import init_expert_parallel, optimizer_param_groups


class Trainer:
    """The loop and its state: engine, stream, schedule, step, and what crosses steps (Transformer-XL's
    memory). What the model, data and evaluation are is the family's (:mod:`smoe.launcher.families`)."""

    def __init__(self, config: TrainConfig, out_dir: Path, resume: bool = False, fresh_ok: bool = False):
        """``fresh_ok``: starting over in a run directory that has no checkpoint yet is allowed
        (a batch job killed before its first save)."""
        # Everything that can be refused is checked before any process group or file exists.
        self.paths = RunDir(Path(out_dir))
        self.config = config = self._check_run_dir(config, resume, fresh_ok)
        self.family = family_of(config, self.paths.root)
        self.family.load_data()
        self.rank, self.world = init_distributed()
        # Refused on the real world size before the run is locked or written: a DeepSpeed config or
        # batch layout that does not fit, an ep_size that does not divide the ranks.
        ds = engine_config(config, self.world, self.paths.tensorboard)
        init_expert_parallel(config.ep_size)
        self.writer = WriterLock(self.paths)
        self._lock_run_dir()
        self.train_stream = self.family.train_stream(self.rank, self.world)
        torch.manual_seed(config.seed + self.rank)  # dropout differs across ranks, reproducibly
        if self.rank == 0:
            self.family.save_with_run(self.paths.root)
        model = self.family.build(config, self.rank)
        if not resume:
            self.family.initialize(model)
        self.engine = build_engine(model, ds, optimizer_param_groups(model, lr=config.lr), lr_multiplier(config),
                                   config.weight_decay)
        self.device = self.engine.device  # this rank's device: DeepSpeed placed the model there
        self.schedule = config.k_schedule()
        self.two_passes = get_method(config.method).consistency  # THOR's consistency term
        self.moe_layers = moe_layers_of(self.engine.module)
        self.optimizer_wrapped = deepspeed_config.wraps_optimizer(self.engine.config)
        self.overflows = OverflowGuard(self.engine.config, config.overflow_patience)
        self._signal: int | None = None  # set by a stop signal (Slurm's warning before preemption)
        self.stopped_by_signal: str | None = None
        self.step = 0
        self.mems = None
        self.dispatch_paths = self._dispatch_paths(resume)
        if resume:
            self._resume()
        if self.rank == 0:  # the config in effect (a resume may change ep_size and non-shape fields)
            self.paths.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.paths.config, json.dumps(self.config.to_dict(), indent=2).encode())

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
            log.info(note)
        if any_rank(refused is not None):
            raise refused or RunDirLocked(f"{self.paths.root} is being written by another process: see rank 0's "
                                          "message")

    def _dispatch_paths(self, resume: bool) -> dict[int, str]:
        """What ``dispatch=auto`` runs at each k: a resumed run's own choices (none for a run started
        without them: the fixed rule), so that it continues exactly; else timed by rank 0 at this
        run's micro-batch size and shared with every rank."""
        config, model = self.config, self.engine.module
        if resume:
            saved = self.paths.dispatch
            choices = {int(k): path for k, path in json.loads(saved.read_text()).items()} if saved.is_file() else {}
        else:
            answer = [{}]
            if self.rank == 0:
                tokens = self.family.tokens_per_step // (self.world * config.grad_accum)
                answer = [autotune_dispatch(model, tokens, self.schedule.values() + list(config.eval_ks))]
            if self.world > 1:
                dist.broadcast_object_list(answer, src=0)
            choices = answer[0]
            if self.rank == 0 and choices:
                self.paths.root.mkdir(parents=True, exist_ok=True)
                write_atomic(self.paths.dispatch, json.dumps(choices, indent=2))
        set_auto_paths(model, choices)
        if choices:
            how = "as timed when the run started" if resume else "fastest at each k on this device"
            log.info(f"dispatch=auto, {how}: " + ", ".join(f"{k}: {path}" for k, path in sorted(choices.items())))
        return choices

    def _resume(self) -> None:
        client, self.mems = checkpoints.load(self.engine, self.paths.checkpoints, self.device, self.config.ep_size,
                                             self.config.seed)
        self.step = client["step"]
        self.train_stream.load_state_dict(client["data"])
        self._replan(TrainConfig.from_saved(client["config"]))
        log.info(f"resumed {self.paths.root} at step {self.step} (k={self.schedule(self.step)})")

    def _replan(self, saved: TrainConfig) -> None:
        """The k and lr schedules of the resumed run: the checkpoint's plan, stretched onto the steps
        left when ``max_steps`` moved (:class:`~smoe.routing.schedule.StepPlan`), and this config's lr,
        lr_min, warm-up and weight decay in place of the checkpoint's optimizer values."""
        plan = saved.step_plan().resumed(self.step, self.config.max_steps)
        self.config = config = dataclasses.replace(self.config, earlier_max_steps=plan.earlier)
        if plan.end != saved.max_steps:
            log.info(f"max_steps {saved.max_steps} -> {plan.end} at step {self.step}: what was left of the k and "
                     f"lr schedules is stretched to end at step {plan.end}")
        self.schedule = config.k_schedule()
        multiplier = lr_multiplier(config)
        lr = config.lr * multiplier(self.step)
        if self.step < plan.end and plan(self.step) >= plan.planned_steps:  # nothing left to stretch
            if lr == 0:
                raise ValueError(f"max_steps={plan.end}: the run had finished its schedules at step {self.step}, "
                                 "its lr decayed to lr_min=0, so it would train on at lr 0: pass lr_min (e.g. "
                                 f"lr_min={config.lr / 10:g}) to train on at that constant lr, or start a new run")
            log.note(f"the run had finished its schedules at step {self.step}: k stays {self.schedule(self.step)} "
                     f"and the lr {lr:g} up to step {plan.end}")
        scheduler = self.engine.lr_scheduler
        groups = scheduler.optimizer.param_groups
        scheduler.lr_lambdas, scheduler.base_lrs = [multiplier] * len(groups), [config.lr] * len(groups)
        for group in groups:
            group["lr"], group["weight_decay"] = lr, config.weight_decay

    def _eval_loss(self, split: str, max_batches: int = 0) -> float:
        return self.family.eval_loss(self.engine.module, split, self.rank, self.world, self.device, max_batches)

    # --- one step ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step. Losses and expert counts stay on the device; the one host sync is
        the read-back of the all-reduced losses and stop flag."""
        k = self.schedule(self.step)
        layers = len(self.moe_layers)
        layer_ks = (self.schedule.layer_ks(self.step, layers, self.config.seed)
                    if self.config.k_sampling == "per-layer" else [k] * layers)
        set_top_k(self.engine.module, layer_ks)
        sums = torch.zeros(3, device=self.device)  # ce, aux, THOR consistency: summed over micro-batches
        counts, states = None, []
        for micro, (micro_batch, state) in enumerate(self.family.micro_batches(self.train_stream, self.mems)):
            if micro:
                self.engine.step()  # DeepSpeed counts micro-steps and updates only at the last one
            first, next_state = self.family.forward(self.engine, micro_batch, state, self.device)
            second = self.family.forward(self.engine, micro_batch, state, self.device)[0] if self.two_passes else None
            losses, state = micro_batch_losses(first, second, self.config.consistency_coef), next_state
            self.engine.backward(losses["total"])
            sums += torch.stack([losses[key].detach().float() if key in losses else sums.new_zeros(())
                                 for key in ("ce", "aux", "consistency")])
            layer_counts = [c for c in losses["counts"] if c is not None]
            counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
            states.append(state)
        self.mems = self.family.carry(states)
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
        return {"k": k, "layer_ks": layer_ks, "mean_layer_k": sum(layer_ks) / layers if layers else None,
                "ce": ce, "aux": aux, "counts": counts, "stop": stop > 0,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "consistency": consistency if self.two_passes else None}

    # --- the loop ----------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> None:
        """Train to ``stop_at`` (default ``max_steps``). SIGUSR1 or SIGTERM (Slurm sends one before a
        time limit or preemption) ends the current step, saves a checkpoint and returns with
        ``stopped_by_signal`` set, so that the job can requeue itself and resume exactly there."""
        config = self.config
        end = min(stop_at or config.max_steps, config.max_steps)
        tokens_per_step = self.family.tokens_per_step
        window = Window()
        log.info(f"training {config.method} ({config.preset}) on {self.family.source}: steps {self.step}->{end}, "
                 f"{self.world} rank(s), ep_size {config.ep_size}, {tokens_per_step:,} tokens/step")
        try:
            if self.step == 0 and config.init and self.moe_layers:
                self.pruned_sweep()
            with _StopSignals(self):
                while self.step < end:
                    started = time.perf_counter()
                    stats = self.train_step()
                    window.add(stats, time.perf_counter() - started)
                    if self.step % config.log_every == 0 or self.step == end or stats["stop"]:
                        self._log(window, tokens_per_step, end)
                        window = Window()
                    if self.step % config.eval_every == 0 or self.step == config.max_steps:
                        self._validate()
                    if self.step % config.save_every == 0 or self.step == end or stats["stop"]:
                        tag = self.save()
                    if stats["stop"]:
                        self.stopped_by_signal = signal.Signals(self._signal).name if self._signal else "a peer rank"
                        log.info(f"stopped by {self.stopped_by_signal} after step {self.step}: checkpoint {tag} "
                                 "saved; continue with --resume (the slurm/ scripts requeue and resume)")
                        return
            if self.step == config.max_steps:
                self.final_sweep()
        finally:
            self.writer.release()  # the run directory is free for the next writer

    def save(self) -> str:
        client = ClientState(step=self.step, world_size=self.world, data=self.train_stream.state_dict(),
                             k_schedule=self.schedule.state_dict(), config=self.config.to_dict(),
                             optimizer_kind=deepspeed_config.optimizer_kind(self.engine.config))
        return checkpoints.save(self.engine, self.paths.checkpoints, self.step, client, self.mems,
                                self.config.keep_checkpoints)

    def _log(self, window: Window, tokens_per_step: int, end: int) -> None:
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
                  ("train/perplexity", math.exp(min(ce, 700)), self.step),
                  ("train/aux_loss", window.mean("aux"), self.step),
                  ("train/lr", self.engine.get_lr()[0], self.step),
                  ("train/tokens_per_s", tokens_per_s, self.step),
                  ("train/step_time_s", step_time, self.step),
                  ("train/peak_memory_mb", peak_memory_mb(self.device), self.step)]
        if self.moe_layers:  # the schedule's k, the mean k the layers ran (per-layer k: drawn), each layer's last
            events += [("moe/top_k", window.last["k"], self.step),
                       ("moe/mean_layer_k", window.mean("mean_layer_k"), self.step)]
            events += [(f"moe/layer{layer}/top_k", k, self.step) for layer, k in enumerate(window.last["layer_ks"])]
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
        k = f"k {window.last['k']} ({self.moe_layers[0].deepspeed_moe.path()}) | " if self.moe_layers else ""
        log.info(f"step {self.step}/{end} | loss {ce:.4f} | {self.family.unit.lower()} {ce / LN2:.4f} | {k}"
                 f"{tokens_per_s:,.0f} tok/s | {step_time:.3f} s/step | ETA {eta}")

    def _validate(self) -> None:
        """The validation split at the schedule's k on every layer (the one logged), whatever the layers ran."""
        if self.moe_layers:
            set_top_k(self.engine.module, self.schedule(self.step))
        loss = self._eval_loss("valid", self.config.eval_segments)
        if self.rank == 0:
            self.engine.monitor.write_events([("val/loss", loss, self.step), ("val/bpc", loss / LN2, self.step),
                                              ("val/perplexity", math.exp(min(loss, 700)), self.step)])
            k = f" (k={self.schedule(self.step)})" if self.moe_layers else ""
            log.info(f"step {self.step} | valid {self.family.unit} {loss / LN2:.4f}{k}")

    def pruned_sweep(self) -> list:
        """The validation split at every k of ``eval_ks`` before the first step: what running an upcycled
        model below k = N costs before any training (the "pruned" curve), into ``pruned.json``."""
        family, model = self.family, self.engine.module
        log.info(f"before training (the weights of {self.config.init}): valid {family.unit} by k\n"
                 f"{format_header(family.unit)}")
        rows = sweep(model, list(self.config.eval_ks), lambda: self._eval_loss("valid", self.config.eval_segments),
                     None, lambda: family.flops_per_token(model, self.device))
        if self.rank == 0:
            report = {"source": family.source, "step": 0, "init": self.config.init, "unit": family.unit,
                      "eval_segments": self.config.eval_segments, "rows": rows_to_json(rows)}
            write_atomic(self.paths.pruned, json.dumps(report, indent=2).encode())
        return rows

    def final_sweep(self) -> list:
        """The validation and test splits at every k in ``eval_ks``: bits per token, active parameters, FLOPs."""
        family, model = self.family, self.engine.module
        log.info(f"{family.unit} by k on {family.source} (valid and test splits)\n{format_header(family.unit)}")
        rows = sweep(model, list(self.config.eval_ks), lambda: self._eval_loss("valid"),
                     lambda: self._eval_loss("test"), lambda: family.flops_per_token(model, self.device))
        if self.rank == 0:
            report = {"source": family.source, "step": self.step, "method": self.config.method, "unit": family.unit,
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
