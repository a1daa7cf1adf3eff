"""`smoe eval RUN`: the BPC-vs-k sweep of a run's latest checkpoint, on its own data or another's."""

from __future__ import annotations

import json
from dataclasses import replace

from smoe.data import OrderedStream, load_corpus

from .build import build_engine, build_model, engine_config, init_distributed
from .checkpoint import loadable_tag
from .evaluate import SweepRow, format_header, lm_sweep, plot, rows_to_json, sweep
from .files import write_atomic
from .masked_lm import MaskedLMData, build_mlm_model
from .run_dir import RunDir


def evaluate_run(run_dir, ks: list[int] | None = None, json_path=None, plot_path=None, data_dir: str | None = None,
                 data_file: str | None = None) -> list[SweepRow]:
    """`smoe eval`: the sweep for a run's latest checkpoint, on its own data unless told otherwise.

    Experts are loaded by global id, so a run trained with any ep_size evaluates on one
    process (ep_size 1) or on as many ranks as it was trained with."""
    rank, world = init_distributed()
    run = RunDir(run_dir)
    config = run.load_config()
    if world % config.ep_size:
        config = replace(config, ep_size=1)
    ks = list(ks or config.eval_ks)
    if any(not 1 <= k <= config.num_experts for k in ks):
        raise ValueError(f"--k {','.join(map(str, ks))}: every k must be between 1 and num_experts "
                         f"({config.num_experts})")
    if config.masked_lm:
        if data_dir or data_file:
            config = replace(config, data_files=tuple(f for f in (data_dir, data_file) if f))
        data = MaskedLMData(config, run.root)
        model, source, unit = build_mlm_model(config, data.tokenizer.pad_token_id, rank), data.source, "bits/token"
    else:
        splits = load_corpus(data_dir or config.data_dir or None, data_file or config.data_file or None)
        model, source, unit = build_model(config, rank), splits.source, "BPC"
    # Checked (every file there, readable, the model's shapes) before DeepSpeed loads it; an older one
    # when the newest is damaged, with a note. The optimizer files are not needed here.
    tag = loadable_tag(run.checkpoints, model)
    engine = build_engine(config, model, engine_config(config, world, None, training=False), training=False)
    device = engine.device
    engine.load_checkpoint(str(run.checkpoints), tag=tag, load_optimizer_states=False,
                           load_lr_scheduler_states=False, load_module_only=True)
    say = print if rank == 0 else (lambda *_: None)
    say(f"{run.root} ({config.method}, {tag}) on {source}\n{format_header(unit)}")
    if config.masked_lm:
        rows = sweep(engine.module, ks, lambda: data.eval_loss(engine.module, "valid", rank, world, device),
                     lambda: data.eval_loss(engine.module, "test", rank, world, device),
                     lambda: data.flops_per_token(engine.module, device), log=say)
    else:
        streams = [OrderedStream(split, config.eval_batch_size, config.eval_tgt_len, rank, world, name=name)
                   for name, split in (("valid", splits.valid), ("test", splits.test))]
        rows = lm_sweep(engine.module, ks, *streams, seq_len=config.eval_tgt_len, mem_len=config.eval_mem_len,
                        vocab_size=config.vocab_size, log=say)
    if rank == 0:
        if json_path:
            report = {"run": str(run.root), "checkpoint": tag, "source": source, "method": config.method,
                      "unit": unit, "rows": rows_to_json(rows)}
            write_atomic(json_path, json.dumps(report, indent=2))
        if plot_path:
            plot(rows, plot_path, f"{config.method} on {source}", unit)
    return rows
