"""The `smoe` command: `smoe train`, `smoe eval`, `smoe slice`, `smoe bench layer|quality|train|infer`,
`smoe ckpt consolidate`, `smoe upcycle` (or `smoe convert`), `smoe slim`, `smoe finetune`, `smoe distill`,
`smoe report`, `smoe export`."""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import sys
from pathlib import Path

from smoe.launcher.runtime import log

# `smoe train` stopped by SIGUSR1/SIGTERM after saving a checkpoint: "try again" (sysexits EX_TEMPFAIL);
# the slurm/ scripts requeue the job on it.
EXIT_STOPPED_BY_SIGNAL = 75


def _add_train(commands) -> None:
    from smoe.launcher.config import presets
    from smoe.launcher.training import trainer

    parser = commands.add_parser(
        "train", help="train Transformer-XL (enwik8 or any byte file) or BERT/RoBERTa (masked-LM on text)",
        description=trainer.__doc__ + "\npresets: " + "; ".join(f"{name}: {values.get('description', '')}"
                                                              for name, values in presets().items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="tiny, paper, paper-8l, paper-12l (Transformer-XL); bert-tiny, roberta-tiny, "
                                         "bert-paper, roberta-paper; causal-lm (with --init), llama-tiny (default: tiny, "
                                         "or causal-lm with --init; a resume: the run's own)")
    parser.add_argument("--method", help="dense, dense-concrete, dense-dropblock, smoe-dropout, smoe-learned, "
                                         "smoe-learned-increasing-k, thor, hash or random (default: smoe-dropout)")
    parser.add_argument("--data-dir", help="directory holding enwik8 or enwik8.zip (downloaded when absent)")
    parser.add_argument("--data-file", help="any raw file, split 90/5/5 by bytes, one token per byte")
    parser.add_argument("--data-files", nargs="+", metavar="PATH",
                        help="masked-LM presets: text files or directories of *.txt (a hub data set: dataset=NAME)")
    parser.add_argument("--tokenizer", help="text presets: a transformers tokenizer directory (default: the --init "
                                            "directory's, else train one)")
    parser.add_argument("--init", help="causal-lm: start from this Hugging Face directory, `smoe upcycle`'s output (or "
                                       "a dense one with --method dense); its shape, experts and tokenizer are the run's")
    parser.add_argument("--out", required=True, help="run directory (config, checkpoints, tb/, eval.json)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint, with its saved config.json: only "
                             "the keys given change (printed); max_steps=N moves its end, the k and lr schedules "
                             "stretched to it")
    resume.add_argument("--auto-resume", action="store_true",
                        help="resume when --out holds a checkpoint, start otherwise (batch jobs that requeue)")
    parser.add_argument("--stop-at", type=int, help="stop (with a checkpoint) at this step; schedules still plan "
                                                   "for max_steps")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override any config key, e.g. max_steps=2000 lr=5e-4 moe_layers=every-2; "
                             "anywhere on the line, before, between or after the options")
    _set_run(parser, _run_train)


def _tokenizer_value(text: str) -> str:
    """``--tokenizer``: a local directory (made absolute, as config.json keeps it) or a bare hub name (kept)."""
    path = Path(text)
    if path.exists() or os.sep in text or "/" in text or text.startswith("."):
        return str(path.resolve())
    return text


def _run_train(args) -> None:
    from smoe.launcher.checkpoints.run_dir import RunDir
    from smoe.launcher.checkpoints.schema import latest_tag
    from smoe.launcher.config import build_config, parse_override, resumed_config
    from smoe.launcher.training.trainer import Trainer

    overrides = dict(parse_override(text) for text in args.overrides)
    if args.method:
        overrides["method"] = args.method
    if args.data_dir:
        overrides["data_dir"] = str(Path(args.data_dir).resolve())
    if args.data_file:
        overrides["data_file"] = str(Path(args.data_file).resolve())
    if args.data_files:
        overrides["data_files"] = tuple(str(Path(f).resolve()) for f in args.data_files)
    if args.tokenizer:
        overrides["tokenizer"] = _tokenizer_value(args.tokenizer)
    run = RunDir(Path(args.out))
    resume = args.resume or (args.auto_resume and latest_tag(run.checkpoints) is not None)
    if resume and run.config.is_file():  # without one, the trainer refuses the resume
        if args.init:
            raise ValueError("--init starts a run; a resume continues from the run's checkpoint: drop --init")
        config, changes = resumed_config(run.load_config(), overrides, args.preset)
        for change in changes:
            log.info(f"resume changes {change}")
    else:
        if args.init:
            overrides["init"] = args.init
        init = overrides.get("init")
        if init and not Path(init, "upcycling.json").is_file() and "method" not in overrides:
            log.note(f"{init} is not upcycled: training it as the dense baseline (`smoe upcycle` it for SMoE-Dropout)")
        if args.preset == "causal-lm" and not init:
            raise ValueError("preset causal-lm takes its model from --init DIR (`smoe upcycle`'s output): pass --init, "
                             "or --preset llama-tiny to train a small Llama from scratch")
        config = build_config(args.preset or ("causal-lm" if init else "tiny"), overrides)
    trainer = Trainer(config, run.root, resume=resume, fresh_ok=args.auto_resume)
    trainer.train(stop_at=args.stop_at)
    return EXIT_STOPPED_BY_SIGNAL if trainer.stopped_by_signal else 0


def _add_eval(commands) -> None:
    parser = commands.add_parser("eval", help="BPC at every k, FLOPs and active parameters of a trained run",
                                 description="Validation and test BPC of a run's latest checkpoint at each k, with "
                                             "inference FLOPs per token and active parameters; --plot draws BPC "
                                             "against active parameters (the paper's Figure 1).")
    parser.add_argument("run_dir", help="the --out directory of a `smoe train` run")
    parser.add_argument("--k", help="comma-separated ks (default: the run's eval_ks); a per-layer slice is one k per "
                                    "MoE layer joined by '/', e.g. --k 1,2,4,2/4/4/8, or a slice's name from "
                                    "RUN/slices.json (`smoe slice`)")
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("--plot", help="write the BPC-vs-active-parameters plot here (PNG)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data-dir", help="evaluate on this enwik8 directory instead of the run's data")
    data.add_argument("--data-file", help="evaluate on this raw file instead of the run's data")
    _set_run(parser, _run_eval)


def _run_eval(args) -> None:
    from smoe.launcher.checkpoints.run_dir import RunDir
    from smoe.launcher.checkpoints.schema import latest_tag
    from smoe.launcher.config import check_k_settings, parse_k_settings
    from smoe.launcher.evaluation.run import evaluate_run
    from smoe.launcher.evaluation.slice import named_slices

    # Refused here, before evaluate_run joins a process group: no run, no checkpoint, a k out of range,
    # an unknown slice name.
    run = RunDir(Path(args.run_dir))
    config = run.load_config()
    ks = parse_k_settings(args.k, slices=named_slices(run)) if args.k else None
    check_k_settings(ks or [], config, f"--k {args.k}")
    if latest_tag(run.checkpoints) is None:
        raise ValueError(f"{run.checkpoints} holds no complete checkpoint: train (or resume) the run first")
    if args.data_file:
        from smoe.data.enwik8 import check_byte_file

        check_byte_file(args.data_file)
    data = {"data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
            "data_file": str(Path(args.data_file).resolve()) if args.data_file else None}
    evaluate_run(Path(args.run_dir), ks, json_path=args.json, plot_path=args.plot, **data)


def _add_bench(commands) -> None:
    from smoe.launcher.bench import layer as bench_layer

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks.")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    layer = benches.add_parser("layer", help="MoE layer time and memory vs the dense MLP and stock DeepSpeed",
                               description=bench_layer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_layer.add_arguments(layer)
    _set_run(layer, _run_bench_layer)
    from smoe.launcher.bench import quality as bench_quality

    quality = benches.add_parser("quality", help="BPC by k of methods trained with the same budget, over seeds, "
                                                 "with paired differences to dense", description=bench_quality.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_quality.add_arguments(quality)
    _set_run(quality, _run_bench_quality)
    from smoe.launcher.bench import train as bench_train

    train = benches.add_parser("train", help="end-to-end training s/step and peak memory, smoe-dropout at each k "
                                             "against dense", description=bench_train.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_train.add_arguments(train)
    _set_run(train, _run_bench_train)
    from smoe.launcher.bench import infer as bench_infer

    infer = benches.add_parser("infer", help="inference latency and tokens/s of an exported model at each k, and the "
                                             "best k under a budget", description=bench_infer.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_infer.add_arguments(infer)
    _set_run(infer, _run_bench_infer)


def _run_bench_layer(args) -> None:
    from smoe.launcher.config import parse_ks
    from smoe.launcher.bench import layer as bench_layer

    parse_ks(args.ks, "--ks")  # refused with the expected form, not int()'s message
    bench_layer.run(args)


def _run_bench_infer(args) -> None:
    from smoe.launcher.bench import infer as bench_infer
    from smoe.launcher.config import parse_ks

    args.ks = parse_ks(args.ks, "--ks") if args.ks else None
    bench_infer.run(args)


def _run_bench_quality(args) -> None:
    """Every run's config and data checked here, so that a mistake is one message, not a failed child."""
    from smoe.data.enwik8 import check_byte_file
    from smoe.data.mlm import text_files

    from smoe.launcher.bench import quality as bench_quality
    from smoe.launcher.config import build_config, parse_override

    overrides = dict(parse_override(text) for text in args.overrides)
    seeds = bench_quality.parse_seeds(args.seeds)
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs} must be at least 1")
    for variant in bench_quality.parse_methods(args.methods):
        own = dict(parse_override(text) for text in variant.overrides)
        for seed in seeds:
            build_config(args.preset, {**overrides, **own, "method": variant.method,
                                       **({} if seed is None else {"seed": seed})})
    if args.data_file:
        check_byte_file(args.data_file)
    else:
        text_files(args.data_files, overrides.get("text_encoding", "utf-8"))
    bench_quality.run(args)


def _run_bench_train(args) -> None:
    """The config, the ks and the data checked here, before the first run starts."""
    from smoe.data.enwik8 import check_byte_file
    from smoe.data.mlm import text_files
    from smoe.launcher.bench import train as bench_train
    from smoe.launcher.config import parse_ks, parse_override

    overrides = dict(parse_override(text) for text in args.overrides)
    config = bench_train.bench_config(args, overrides)
    if config.text != bool(args.data_files):
        raise ValueError(f"preset {bench_train.preset(args)} trains {config.model}: pass "
                         + ("--data-files (text)" if config.text else "--data-file (a byte file)"))
    for k in parse_ks(args.ks, "--ks") if args.ks else []:
        bench_train.bench_config(args, {**overrides, "k_min": k, "k_max": k})
    if args.warmup < 0 or args.steps < 1:
        raise ValueError(f"--warmup ({args.warmup}) must not be negative and --steps ({args.steps}) at least 1")
    if args.data_file:
        check_byte_file(args.data_file)
    else:
        text_files(args.data_files, config.text_encoding)
    bench_train.run(args)


def _add_ckpt(commands) -> None:
    from smoe.launcher.checkpoints import consolidate

    ckpt = commands.add_parser("ckpt", help="checkpoint tools", description="Checkpoint tools.")
    tools = ckpt.add_subparsers(dest="tool", required=True, metavar="TOOL")
    parser = tools.add_parser("consolidate", help="one portable safetensors file from a run of any ep_size",
                              description=consolidate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the --out directory of a `smoe train` run (its latest checkpoint is used)")
    parser.add_argument("out", help="the file to write, e.g. model.safetensors")
    _set_run(parser, _run_consolidate)


def _run_consolidate(args) -> None:
    from smoe.launcher.checkpoints.consolidate import consolidate

    out = consolidate(Path(args.run_dir), Path(args.out))
    log.info(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


# Commands whose module has add_arguments(parser) and run(args): name -> (module, one-line help).
MODULE_COMMANDS = {
    "upcycle": ("smoe.launcher.downstream.upcycle", "a dense Hugging Face model (Llama, Mistral, Qwen2/3, GPT-2, "
                                                    "BERT, RoBERTa) split into experts, exact at k = N"),
    "convert": ("smoe.launcher.downstream.upcycle", "the same as `smoe upcycle`"),
    "slim": ("smoe.launcher.downstream.slim", "keep the B most used experts per layer for fine-tuning"),
    "finetune": ("smoe.launcher.downstream.finetune", "fine-tune a slim or converted model on a downstream task"),
    "distill": ("smoe.launcher.downstream.distill", "distil a fine-tuned SST-2 teacher into a single-expert student"),
    "report": ("smoe.launcher.downstream.report", "the paper's downstream tables and figure from a directory of runs"),
    "slice": ("smoe.launcher.evaluation.slice", "per-layer ks of best held-out quality under a FLOPs or parameter "
                                               "budget, named in RUN/slices.json"),
    "export": ("smoe.launcher.export.run", "a Hugging Face directory that loads without smoe, any k at load time"),
}


def _add_module_command(commands, name: str) -> None:
    module_name, summary = MODULE_COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = commands.add_parser(name, help=summary, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    _set_run(parser, module.run)


def _set_run(parser: argparse.ArgumentParser, run) -> None:
    """A command's entry point, and its parser (for errors found after parsing, with its usage line)."""
    parser.set_defaults(run=run, command_parser=parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe", description="SMoE-Dropout transformers on DeepSpeed.")
    # The deepspeed launcher puts --local_rank before the subcommand; LOCAL_RANK in the environment is what is used.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_eval(commands)
    _add_bench(commands)
    _add_ckpt(commands)
    for name in MODULE_COMMANDS:
        _add_module_command(commands, name)
    return parser


# KEY=VALUE: a config key (dashes allowed, as parse_override reads them; dotted for a section), then "=".
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*=")


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line, with KEY=VALUE overrides anywhere in it: before, between and after options.

    argparse's ``nargs="*"`` positional takes one contiguous run of them, and
    ``parse_intermixed_args`` does not work with subcommands. So: parse the known arguments,
    then every leftover that is not an option is an override of a command that has them (``smoe
    train``, ``smoe bench quality``; parse_override refuses one that is not KEY=VALUE), as is a
    KEY=VALUE that ``--data-files`` swallowed and that is no existing path. The overrides keep
    their order on the command line (a later one of the same key wins). Any other leftover is
    argparse's own "unrecognized arguments" error (exit 2)."""
    parser = parser or build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args, extras = parser.parse_known_args(argv)
    command_parser = getattr(args, "command_parser", None) or parser
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    unknown = [e for e in extras if e.startswith("-") or not takes_overrides]
    if unknown:
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not takes_overrides:
        return args
    found = list(args.overrides) + extras
    data_files = getattr(args, "data_files", None)
    if data_files:
        swallowed = [f for f in data_files if OVERRIDE.match(f) and not Path(f).exists()]
        if swallowed and len(swallowed) == len(data_files):
            command_parser.error(f"--data-files needs a text file or directory before the overrides "
                                 f"({swallowed[0]} is a KEY=VALUE override, not a file)")
        args.data_files = [f for f in data_files if f not in swallowed]
        found += swallowed
    # In command-line order: walk argv, taking each override where it stands.
    left = collections.Counter(found)
    ordered = []
    for token in argv:
        if left[token] > 0:
            ordered.append(token)
            left[token] -= 1
    args.overrides = ordered + list(left.elements())
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported and probes for one
    args = parse_args(argv)
    try:
        code = args.run(args)
        from smoe.launcher.runtime.distributed import leave_process_group

        leave_process_group()
    except (ValueError, FileNotFoundError) as error:
        log.error(str(error))
        return 2
    except OSError as error:  # a checkpoint the disk refused (full, I/O error, no permission)
        from smoe.launcher.checkpoints.save import CheckpointWriteError

        if not isinstance(error, CheckpointWriteError):
            raise
        log.error(str(error))
        return 4
    except RuntimeError as error:
        from smoe.launcher.training.losses import TrainingDiverged

        if not isinstance(error, TrainingDiverged):
            raise
        log.error(str(error))
        return 3
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
