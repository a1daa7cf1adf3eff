"""The `smoe` command's refusals as one table, and KEY=VALUE overrides anywhere on the line.

Every case is (argv, exit code, words the message must hold). Each runs in this process
through ``main(argv)`` when it is refused before any process group exists (checked), or in
a subprocess when the refusal comes after one. Every case must exit with its code, say its
words on stderr, print no traceback, and leave every directory it names as it was: no run
directory made, none changed (the whole fixture tree is snapshotted around each case).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from runs import SMALL, smoe
from smoe.launcher.cli import main, parse_args

# The fixture run: the small model for 2 steps, overrides before, between and after the options;
# max_steps is given twice, and the later one wins.
FIXTURE_TRAIN = ["train", "max_steps=5", SMALL[0], "--data-file", "{corpus}", SMALL[1], "--method", "smoe-dropout",
                 *SMALL[2:], "--out", "{run}", "max_steps=2", "save_every=100", "eval_every=100"]

TRAIN = ["train", "--data-file", "{corpus}", "--out", "{out}", *SMALL]
BERT = ["train", "--preset", "bert-tiny", "--data-files", "{books}", "--out", "{out}"]
SLIM = ["slim", "{run}", "--data", "{sst2}/train.tsv", "--out", "{out}"]
FINETUNE = ["finetune", "sst2", "--model", "{slim}", "--data", "{sst2}", "--out", "{out}"]
DISTILL = ["distill", "--teacher", "{teacher}", "--student", "{slim}", "--data", "{sst2}", "--out", "{out}"]

PROCESS = "process"  # refused after a process group exists: run `smoe` in its own process

CASES = {
    # smoe train: the config
    "train-unknown-preset": (["train", "--preset", "nope", "--data-file", "{corpus}", "--out", "{out}"], 2,
                             ["preset 'nope' is unknown", "tiny"]),
    "train-unknown-key": ([*TRAIN, "max_stepz=3"], 2, ["config key 'max_stepz' does not exist",
                                                        "did you mean 'max_steps'?"]),
    "train-unknown-key-first": (["train", "max_stepz=3", *TRAIN[1:]], 2, ["did you mean 'max_steps'?"]),
    "train-override-not-key-value": ([*TRAIN, "maxsteps"], 2, ["override 'maxsteps' is not key=value",
                                                                "max_steps=1000"]),
    "train-override-wrong-type": ([*TRAIN, "max_steps=abc"], 2, ["override max_steps=abc: expected int"]),
    "train-negative-lr": ([*TRAIN, "lr=-1e-3"], 2, ["lr (-0.001) must not be negative"]),
    "train-unknown-router-option": ([*TRAIN, "router.balance_coeff=0.1"], 2,
                                    ["config key 'router.balance_coeff' does not exist",
                                     "did you mean 'router.balance_coef'?"]),
    "train-negative-router-option": ([*TRAIN, "router.z_loss_coef=-1"], 2,
                                     ["router.z_loss_coef (-1.0) must not be negative"]),
    "train-k-max-over-experts": ([*TRAIN, "k_max=8"], 2, ["k_max (8) is larger than the number of experts (4)"]),
    "train-k-min-over-k-max": ([*TRAIN, "k_min=3", "k_max=2"], 2, ["k_min (3) is larger than k_max (2)"]),
    "train-eval-ks-outside": ([*TRAIN, "eval_ks=1,8"], 2, ["eval_ks [8] outside 1..num_experts (4)"]),
    "train-unknown-method": ([*TRAIN, "--method", "nope"], 2, ["method 'nope' is unknown", "smoe-dropout"]),
    "train-unknown-moe-layers": ([*TRAIN, "moe_layers=bogus"], 2, ["moe_layers 'bogus' is unknown", "every-2"]),
    "train-unknown-lr-decay": ([*TRAIN, "lr_decay=step"], 2, ["lr_decay 'step' is unknown", "cosine"]),
    "train-bad-combine-scale": ([*TRAIN, "combine_scale=half"], 2, ["combine_scale 'half' is not N or a positive "
                                                                     "number", "combine_scale=1 (the paper's)"]),
    # smoe train: the run directory
    "train-resume-no-run": ([*TRAIN, "--resume"], 2, ["--resume", "holds no run (no config.json)", "drop --resume"]),
    "train-into-existing-run": (["train", "--data-file", "{corpus}", "--out", "{run}", *SMALL], 2,
                                ["already holds a run", "pass --resume", "nothing was overwritten"]),
    "train-resume-new-shape": (["train", "--data-file", "{corpus}", "--out", "{run}", *SMALL, "d_model=64",
                                "--resume"], 2, ["cannot resume", "d_model: saved 32, now 64"]),
    "train-resume-new-combine-scale": (["train", "--data-file", "{corpus}", "--out", "{run}", *SMALL,
                                        "combine_scale=3", "--resume"], 2,
                                       ["cannot resume", "combine_scale: saved", "now '3'"]),
    # smoe train: data and tokenizer
    "train-data-file-missing": (["train", "--data-file", "{root}/nope.txt", "--out", "{out}", *SMALL], 2,
                                ["data file", "nope.txt does not exist", "--data-file"]),
    "train-data-file-is-directory": (["train", "--data-file", "{empty}", "--out", "{out}", *SMALL], 2,
                                     ["is a directory", "--data-file takes one file", "--data-dir"]),
    "train-data-dir-is-file": (["train", "--data-dir", "{corpus}", "--out", "{out}", *SMALL], 2,
                               ["is a file", "--data-dir takes the directory", "pass --data-file"]),
    "train-data-too-short": ([*TRAIN, "tgt_len=100000"], 2, ["too short for batch_size 4 x tgt_len 100000"]),
    "train-data-files-missing": (["train", "--preset", "bert-tiny", "--data-files", "{root}/nope.txt",
                                  "--out", "{out}"], 2, ["--data-files", "nope.txt does not exist"]),
    "train-data-files-no-text": (["train", "--preset", "bert-tiny", "--data-files", "{empty}", "--out", "{out}"],
                                 2, ["no *.txt file there"]),
    "train-data-files-only-overrides": (["train", "--preset", "bert-tiny", "--data-files", "max_steps=3",
                                         "--out", "{out}"], 2, ["--data-files needs a text file or directory"]),
    "train-tokenizer-missing": ([*BERT, "--tokenizer", "{root}/no-tokenizer"], 2,
                                ["no-tokenizer does not exist", "transformers tokenizer directory",
                                 "leave --tokenizer out"]),
    "train-tokenizer-not-a-tokenizer": ([*BERT, "--tokenizer", "{books}"], 2,
                                        ["holds no tokenizer", "tokenizer.json", "leave --tokenizer out"]),
    "train-tokenizer-unreadable": ([*BERT, "--tokenizer", "{bad_tokenizer}"], 2,
                                   ["bad-tokenizer: transformers could not load it", "leave --tokenizer out"]),
    "train-tokenizer-unknown-name": ([*BERT, "--tokenizer", "no-such-tokenizer"], 2,
                                     ["tokenizer no-such-tokenizer is no local directory", "leave --tokenizer out"]),
    # smoe train: the layout and DeepSpeed config, refused on the real world size, before the run is locked
    "train-ep-size-not-dividing-experts": ([*TRAIN, "ep_size=3"], 2, ["ep_size (3) does not divide num_experts (4)"]),
    "train-ep-size-not-dividing-world": ([*TRAIN, "ep_size=2"], 2, ["ep_size (2) does not divide the world size (1)"],
                                         PROCESS),
    "train-batch-not-divisible": ([*TRAIN, "grad_accum=3"], 2, ["batch_size (4)", "not divisible by 3"], PROCESS),
    "train-ds-config-fixed-batch": ([*TRAIN, "ds_config={fixed_batch}"], 2,
                                    ["sets train_batch_size=8", "this run has train_batch_size=4",
                                     "use batch_size=8"], PROCESS),
    "train-unknown-ds-config": ([*TRAIN, "ds_config=nope"], 2, ["DeepSpeed config 'nope' not found", "cpu"], PROCESS),
    "train-ds-config-not-json": ([*TRAIN, "ds_config={bad_json}"], 2, ["is not valid JSON"], PROCESS),
    "train-zero3-with-experts": ([*TRAIN, "ds_config={zero3}"], 2, ["ZeRO stage 3", "use stage 2"], PROCESS),
    # smoe train: argparse
    "train-stop-at-not-int": ([*TRAIN, "--stop-at", "x"], 2, ["argument --stop-at: invalid int value: 'x'"]),
    "train-no-out": (["train", "--data-file", "{corpus}", *SMALL], 2, ["required: --out"]),
    "train-unknown-option": ([*TRAIN, "--bogus", "1"], 2, ["smoe train: error: unrecognized arguments: --bogus"]),
    "train-unknown-key-in-a-process": ([*TRAIN, "max_stepz=3"], 2, ["did you mean 'max_steps'?"], PROCESS),
    # smoe eval
    "eval-no-config": (["eval", "{empty}"], 2, ["is not a run directory (no config.json)"]),
    "eval-no-checkpoint": (["eval", "{no_checkpoint}"], 2, ["holds no complete checkpoint"]),
    "eval-k-not-integers": (["eval", "{run}", "--k", "abc"], 2,
                            ["--k abc: expected comma-separated ks", "e.g. --k 1,2,4,2/4/4/8"]),
    "eval-slice-wrong-length": (["eval", "{run}", "--k", "2,1/2/3"], 2,
                                ["--k 2,1/2/3: the slice 1/2/3 has 3 per-layer ks for a run with 2 MoE layers"]),
    "eval-slice-k-99": (["eval", "{run}", "--k", "1/99"], 2, ["--k 1/99: every k must be between 1 and num_experts"]),
    "eval-k-0": (["eval", "{run}", "--k", "0"], 2, ["--k 0: every k must be between 1 and num_experts (4)"]),
    "eval-k-99": (["eval", "{run}", "--k", "1,99"], 2, ["--k 1,99: every k must be between 1 and num_experts (4)"]),
    "eval-data-file-is-directory": (["eval", "{run}", "--data-file", "{empty}"], 2, ["is a directory"]),
    "eval-two-data-sources": (["eval", "{run}", "--data-file", "{corpus}", "--data-dir", "{empty}"], 2,
                              ["not allowed with argument"]),
    "eval-takes-no-overrides": (["eval", "{run}", "max_steps=3"], 2, ["unrecognized arguments: max_steps=3"]),
    # smoe slim
    "slim-budget-0": ([*SLIM, "--budget", "0"], 2, ["--budget 0 must be between 1 and the run's 4 experts"]),
    "slim-budget-99": ([*SLIM, "--budget", "99"], 2, ["--budget 99 must be between 1 and the run's 4 experts"]),
    "slim-no-budget": (SLIM, 2, ["one of the arguments --budget --params is required"]),
    "slim-no-data-argument": (["slim", "{run}", "--budget", "2", "--out", "{out}"], 2,
                              ["the following arguments are required: --data"]),
    "slim-data-missing": (["slim", "{run}", "--budget", "2", "--data", "{root}/nope.tsv", "--out", "{out}"], 2,
                          ["--data", "nope.tsv does not exist"]),
    "slim-params-not-a-count": ([*SLIM, "--params", "1x"], 2, ["--params 1x is not a parameter count", "600k"]),
    "slim-params-too-small": ([*SLIM, "--params", "10"], 2, ["--params 10 is too small"]),
    "slim-not-a-run": (["slim", "{empty}", "--budget", "2", "--data", "{sst2}/train.tsv", "--out", "{out}"], 2,
                       ["is not a run directory"]),
    "slim-no-checkpoint": (["slim", "{no_checkpoint}", "--budget", "2", "--data", "{sst2}/train.tsv",
                            "--out", "{out}"], 2, ["holds no complete checkpoint"]),
    # smoe finetune
    "finetune-unknown-task": (["finetune", "nope", "--model", "{slim}", "--out", "{out}"], 2,
                              ["task 'nope' is unknown", "sst2"]),
    "finetune-model-missing": (["finetune", "sst2", "--model", "{root}/nope", "--data", "{sst2}", "--out", "{out}"],
                               2, ["holds neither config.json nor model.safetensors"]),
    "finetune-plain-model": (["finetune", "sst2", "--model", "{dense}", "--data", "{sst2}", "--out", "{out}"], 2,
                             ["plain 'bert' model", "smoe convert"]),
    "finetune-wrong-family": (["finetune", "csqa", "--model", "{slim}", "--out", "{out}"], 2,
                              ["csqa fine-tunes bert or roberta models", "transformer-xl"]),
    "finetune-k-0": ([*FINETUNE, "--k", "0"], 2, ["--k 0 must be at least 1"]),
    "finetune-k-99": ([*FINETUNE, "--k", "99"], 2, ["--k 99 must be between 1 and the model's 2 experts"], PROCESS),
    "finetune-bad-splits": ([*FINETUNE, "--splits", "fold9"], 2, ["--splits ['fold9'] are not splits of sst2"]),
    "finetune-data-missing": (["finetune", "sst2", "--model", "{slim}", "--data", "{empty}", "--out", "{out}"], 2,
                              ["train.tsv does not exist"]),
    "finetune-epochs-0": ([*FINETUNE, "--epochs", "0"], 2, ["--epochs must be at least 1"]),
    "finetune-lr-not-a-number": ([*FINETUNE, "--lr", "fast"], 2, ["argument --lr: invalid float value"]),
    # smoe distill
    "distill-teacher-missing": ([*DISTILL[:2], "{root}/nope", *DISTILL[3:]], 2,
                                ["--teacher", "nope does not exist", "smoe finetune sst2"]),
    "distill-teacher-other-task": (DISTILL, 2, ["--teacher", "was fine-tuned on csqa"]),
    "distill-teacher-not-a-classifier": ([*DISTILL[:2], "{dense}", *DISTILL[3:]], 2,
                                         ["holds no fine-tuned classifier"]),
    "distill-alpha-2": ([*DISTILL, "--alpha", "2"], 2, ["--alpha 2.0 must be in [0, 1]"]),
    "distill-temperature-0": ([*DISTILL, "--temperature", "0"], 2, ["--temperature 0.0 must be positive"]),
    "distill-k-0": ([*DISTILL, "--k", "0"], 2, ["--k 0 must be at least 1"]),
    # smoe convert
    "convert-missing-dir": (["convert", "{root}/nope", "{out}"], 2, ["holds no config.json"]),
    "convert-experts-not-dividing": (["convert", "{dense}", "{out}", "--num-experts", "5"], 2,
                                     ["intermediate_size (32) is not divisible by num_experts (5)"]),
    "convert-experts-0": (["convert", "{dense}", "{out}", "--num-experts", "0"], 2,
                          ["--num-experts 0 must be at least 1"]),
    "convert-k-over-experts": (["convert", "{dense}", "{out}", "--num-experts", "4", "--k", "9"], 2,
                               ["--k 9 must be between 1 and --num-experts (4)"]),
    "convert-unknown-method": (["convert", "{dense}", "{out}", "--num-experts", "4", "--method", "nope"], 2,
                               ["method 'nope' is unknown"]),
    "convert-bad-combine-scale": (["convert", "{dense}", "{out}", "--num-experts", "4", "--combine-scale", "-2"], 2,
                                  ["combine_scale '-2' is not N or a positive number"]),
    "convert-not-ours-to-convert": (["convert", "{slim}", "{out}"], 2, ["holds no config.json"]),
    # smoe ckpt consolidate
    "consolidate-not-a-run": (["ckpt", "consolidate", "{empty}", "{out}/model.safetensors"], 2,
                              ["is not a run directory"]),
    "consolidate-no-checkpoint": (["ckpt", "consolidate", "{no_checkpoint}", "{out}/model.safetensors"], 2,
                                  ["holds no complete checkpoint"]),
    # smoe report
    "report-no-results": (["report", "{empty}", "--out", "{out}"], 2, ["no result.json or slices.json under"]),
    "report-missing-dir": (["report", "{root}/nope", "--out", "{out}"], 2, ["is not a directory"]),
    # smoe bench
    "bench-layer-unknown-size": (["bench", "layer", "--sizes", "huge", "--no-memory"], 2,
                                 ["--sizes: 'huge' is unknown", "transformer-xl"]),
    "bench-layer-fp16-on-cpu": (["bench", "layer", "--dtype", "fp16", "--device", "cpu"], 2,
                                ["--dtype fp16 needs --device cuda"]),
    "bench-layer-ks-not-integers": (["bench", "layer", "--ks", "1,two", "--device", "cpu"], 2,
                                    ["--ks 1,two: expected comma-separated integers"]),
    "bench-quality-no-data": (["bench", "quality", "--out", "{out}"], 2,
                              ["one of the arguments --data-file --data-files is required"]),
    "bench-quality-data-missing": (["bench", "quality", "--data-file", "{root}/nope", "--out", "{out}"], 2,
                                   ["does not exist"]),
    "bench-quality-unknown-key": (["bench", "quality", "max_stepz=3", "--data-file", "{corpus}", "--out", "{out}"],
                                  2, ["config key 'max_stepz' does not exist"]),
    "bench-quality-unknown-method": (["bench", "quality", "--data-file", "{corpus}", "--out", "{out}",
                                      "--methods", "smoe-dropout,nope"], 2, ["method 'nope' is unknown"]),
    "bench-quality-unknown-variant-key": (["bench", "quality", "--data-file", "{corpus}", "--out", "{out}",
                                           "--methods", "dense,smoe-dropout:combine_scal=1"], 2,
                                          ["config key 'combine_scal' does not exist", "'combine_scale'"]),
    "bench-quality-variant-without-method": (["bench", "quality", "--data-file", "{corpus}", "--out", "{out}",
                                              "--methods", ":combine_scale=1"], 2, ["names no method"]),
    "bench-quality-seeds-not-integers": (["bench", "quality", "--data-file", "{corpus}", "--out", "{out}",
                                          "--seeds", "0,one"], 2, ["--seeds 0,one: expected comma-separated integers"]),
    "bench-quality-jobs-0": (["bench", "quality", "--data-file", "{corpus}", "--out", "{out}", "--jobs", "0"], 2,
                             ["--jobs 0 must be at least 1"]),
    "bench-train-wrong-data": (["bench", "train", "--preset", "bert-tiny", "--data-file", "{corpus}", "--out", "{out}"],
                               2, ["preset bert-tiny trains bert: pass --data-files (text)"]),
    "bench-train-k-over-experts": (["bench", "train", "--data-file", "{corpus}", "--out", "{out}", "--ks", "8,32"], 2,
                                   ["k_max (32) is larger than the number of experts (16)"]),
    "bench-train-no-steps": (["bench", "train", "--data-file", "{corpus}", "--out", "{out}", "--steps", "0"], 2,
                             ["--steps (0) at least 1"]),
    # the command itself
    "unknown-subcommand": (["frobnicate"], 2, ["invalid choice: 'frobnicate'"]),
    "no-subcommand": ([], 2, ["the following arguments are required: COMMAND"]),
}


@pytest.fixture(scope="session")
def places(tmp_path_factory, corpus, books, sst2) -> dict[str, str]:
    """The directories the cases name: a real small run, a slim model of it, a dense BERT, and the broken ones."""
    root = tmp_path_factory.mktemp("cli-errors")
    places = {"root": root, "corpus": corpus, "books": books, "sst2": sst2, "run": root / "run",
              "empty": root / "empty", "no_checkpoint": root / "no-checkpoint", "slim": root / "slim",
              "dense": root / "dense-bert", "teacher": root / "csqa-run", "zero3": root / "zero3.json",
              "fixed_batch": root / "fixed-batch.json", "bad_json": root / "bad.json",
              "bad_tokenizer": root / "bad-tokenizer"}
    places = {name: str(path) for name, path in places.items()}
    smoe(*fill(FIXTURE_TRAIN, places))
    assert main(["slim", places["run"], "--budget", "2", "--data", f"{sst2}/train.tsv", "--out", places["slim"]]) == 0
    (root / "empty").mkdir()
    (root / "no-checkpoint").mkdir()
    shutil.copy(root / "run" / "config.json", root / "no-checkpoint")
    (root / "csqa-run").mkdir()
    (root / "csqa-run" / "result.json").write_text(json.dumps({"task": "csqa", "dev": {"accuracy": 0.5}}))
    (root / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (root / "fixed-batch.json").write_text(json.dumps({"train_batch_size": 8}))
    (root / "bad.json").write_text("{stage: 3")
    (root / "bad-tokenizer").mkdir()
    (root / "bad-tokenizer" / "tokenizer.json").write_text("{not json")
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32)).save_pretrained(root / "dense-bert")
    return places


def fill(argv: list[str], places: dict[str, str], out: str = "") -> list[str]:
    return [arg.format(**places, out=out) for arg in argv]


def snapshot(*roots) -> dict:
    """Every path under ``roots`` with its mtime and size."""
    from pathlib import Path

    tree = {}
    for root in map(Path, roots):
        for path in [root, *root.rglob("*")]:
            if path.exists():
                stat = path.stat()
                tree[str(path)] = (stat.st_mtime_ns, stat.st_size if path.is_file() else None)
    return tree


@pytest.mark.parametrize("name", CASES)
def test_refusal(name, places, tmp_path, capsys, monkeypatch):
    argv, code, words, *how = CASES[name]
    out = str(tmp_path / "out")
    argv = fill(argv, places, out)
    watched = (places["root"], places["corpus"], places["books"], places["sst2"], tmp_path)
    before = snapshot(*watched)
    # Offline, as this project runs: a hub name fails at once instead of retrying the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if how == [PROCESS]:
        result = smoe(*argv, check=False)
        exit_code, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        had_group = torch.distributed.is_initialized()
        for launcher_variable in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                                  "SLURM_PROCID"):  # a plain `smoe` on one process, wherever pytest runs
            monkeypatch.delenv(launcher_variable, raising=False)
        try:
            exit_code = main(argv)
        except SystemExit as exit_:  # argparse's refusals
            exit_code = exit_.code
        stdout, stderr = capsys.readouterr()
        assert had_group or not torch.distributed.is_initialized(), \
            f"{name} started a process group: run it in its own process (PROCESS)"
    assert exit_code == code, f"{name}: exit {exit_code}, expected {code}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    for word in words:
        assert word in stderr, f"{name}: {word!r} is not in the message:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr + stdout
    assert snapshot(*watched) == before, f"{name} created or changed files"


def test_the_fixture_run_took_overrides_from_every_position(places):
    """`smoe train` with overrides before, between and after the options (FIXTURE_TRAIN)."""
    from pathlib import Path

    config = json.loads((Path(places["run"]) / "config.json").read_text())
    assert (config["n_layer"], config["d_model"], config["num_experts"], config["method"]) == (2, 32, 4, "smoe-dropout")
    assert (config["max_steps"], config["save_every"], config["eval_every"]) == (2, 100, 100)
    assert (Path(places["run"]) / "checkpoints" / "latest").read_text().strip() == "step000002"


OVERRIDES = ["max_steps=10", "k_min=2", "lr=1e-3"]


@pytest.mark.parametrize("argv", [
    ["train", "--preset", "tiny", "max_steps=10", "--method", "dense", "k_min=2", "--out", "x", "lr=1e-3"],
    ["train", "max_steps=10", "k_min=2", "lr=1e-3", "--preset", "tiny", "--out", "x"],
    ["train", "--preset", "tiny", "--out", "x", "max_steps=10", "k_min=2", "lr=1e-3"],
    ["train", "max_steps=10", "--out", "x", "k_min=2", "--resume", "lr=1e-3"],
    ["train", "--out", "x", "--stop-at", "5", "max_steps=10", "--auto-resume", "k_min=2", "--data-file", "f",
     "lr=1e-3"],
    ["--local_rank=0", "train", "max_steps=10", "--out", "x", "k_min=2", "--method", "thor", "lr=1e-3"],
], ids=["between", "before", "after", "around-a-flag", "everywhere", "deepspeed-launcher"])
def test_overrides_anywhere(argv):
    args = parse_args(argv)
    assert args.overrides == OVERRIDES
    assert args.out == "x"


def test_overrides_keep_their_order():
    """The later of two values of a key wins, wherever the two stand."""
    from smoe.launcher.config import parse_override

    args = parse_args(["train", "lr=1", "--out", "x", "k_min=2", "--preset", "tiny", "lr=2"])
    assert args.overrides == ["lr=1", "k_min=2", "lr=2"]
    assert dict(map(parse_override, args.overrides))["lr"] == 2.0


def test_data_files_give_back_the_overrides_they_swallowed(books):
    files = [str(books / "a.txt"), str(books / "b.txt")]
    args = parse_args(["train", "--preset", "bert-tiny", "max_steps=3", "--data-files", *files, "k_min=2",
                       "--out", "x", "lr=1e-3"])
    assert args.data_files == files
    assert args.overrides == ["max_steps=3", "k_min=2", "lr=1e-3"]


def test_bench_quality_takes_overrides_anywhere():
    args = parse_args(["bench", "quality", "max_steps=10", "--data-file", "f", "k_min=2", "--out", "o", "lr=1e-3"])
    assert args.overrides == OVERRIDES


def test_train_help_shows_the_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    assert "KEY=VALUE" in capsys.readouterr().out
