#!/usr/bin/env python3
"""The parts of the one-GPU check (scripts/gpu-check.sh), each run in a process of its own by
scripts/gpu_check.py under its own time limit:

    python scripts/gpu_check_parts.py PART --work DIR --out DIR --device cuda|cpu [--wheels DIR]

A part prints what it runs (its log) and writes DIR/results/PART.json: its status (pass, fail or
skip), a one-line headline of its key figures, and the figures themselves, rewritten as each figure
is known so that a part stopped at its limit still shows how far it got. ``--device cpu`` runs every
part at tiny sizes (gloo instead of NCCL), so the check is debugged before a GPU's minutes are spent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Sizes per device: the paper's shapes in bf16 on a GPU, a few seconds each on a 2-core CPU.
SIZES = {
    "cuda": {
        # the `tiny` preset (2 layers, d_model 128, d_ff 2048, 16 experts, batch 16 x 64 bytes), 40 steps
        "train": ["max_steps=40", "log_every=5", "warmup_steps=5", "eval_every=1000", "save_every=20",
                  "eval_segments=8", "eval_ks=1,4,16"],
        "corpus_bytes": 400_000,
        "exchange": {"d_model": 256, "d_ff": 8192, "num_experts": 16, "tokens": 2048, "ks": (1, 2, 4, 8, 16)},
        "export": {"ks": "1,4,16", "batch": "32", "length": "128", "repeats": "5", "budget_ms": "100"},
        "layer": {"sizes": "transformer-xl,bert", "ks": "1,2,4,8,16", "tokens": 4096, "experts": 16, "repeats": 5,
                  "memory": True},
        "step_bench": [],
    },
    "cpu": {
        "train": ["n_layer=1", "d_model=32", "n_head=2", "d_head=16", "d_ff=256", "num_experts=4", "k_min=1",
                  "k_max=4", "tgt_len=16", "mem_len=16", "eval_tgt_len=16", "batch_size=4", "eval_batch_size=4",
                  "max_steps=6", "log_every=1", "warmup_steps=2", "eval_every=100", "save_every=100",
                  "eval_segments=2", "eval_ks=1,4"],
        "corpus_bytes": 30_000,
        "exchange": {"d_model": 32, "d_ff": 256, "num_experts": 4, "tokens": 64, "ks": (1, 2, 4)},
        "export": {"ks": "1,4", "batch": "2", "length": "16", "repeats": "1", "budget_ms": "1000"},
        "layer": {"sizes": "tiny", "ks": "1,2,4", "tokens": 128, "experts": 4, "repeats": 1, "memory": False},
        "step_bench": ["--device", "cpu", "--tiny"],
    },
}
PATHS = ("auto", "sorted", "grouped", "masked-dense")  # the layer benchmark's dispatch runs
GROUPED_REFUSED = "dispatch 'grouped' needs"  # the layer's refusal, where grouped_mm cannot take the shapes
# What every part imports (the environment fails without them), and what only some need: datasets the
# GPU tier's masked-LM tests, pytest the GPU tier itself.
NEEDED = ("smoe", "deepspeed", "transformers", "tensorboard", "safetensors")
NEEDED_BY_SOME = ("datasets", "pytest")
INSTALL = ("install a CUDA build of torch, DeepSpeed 0.19, datasets, transformers, tensorboard, safetensors and "
           "pytest (pip install -e '.[test]'), or carry them as wheels: bash scripts/gpu-wheels.sh DIR, then "
           "bash scripts/gpu-check.sh --wheels DIR")


class Skip(Exception):
    """The part cannot run here (its reason is the headline)."""


class Failed(Exception):
    """The part ran and something was wrong (a one-line message)."""


@dataclass
class Part:
    name: str
    limit_s: int  # its own time limit; the check's budget may give it less
    what: str  # one line for the plan
    run: object = None  # Context -> headline


@dataclass
class Context:
    name: str
    work: Path
    out: Path
    device: str  # "cuda" or "cpu"
    wheels: Path | None = None
    figures: dict = field(default_factory=dict)

    @property
    def sizes(self) -> dict:
        return SIZES[self.device]

    def figure(self, key: str, value) -> None:
        """Record a figure now, so that it survives the part being stopped at its limit."""
        self.figures[key] = value
        self.write("running", "")

    def write(self, status: str, headline: str) -> None:
        path = self.work / "results" / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"status": status, "headline": headline, "figures": self.figures}, indent=1))


# --- running things -------------------------------------------------------------------------------

def run(command: list, cwd: Path = REPO, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command, its output into this part's log; a failure raises :class:`Failed` with its last line."""
    command = [str(c) for c in command]
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    print(f"{result.stdout}{result.stderr}({time.monotonic() - started:.1f} s, exit {result.returncode})", flush=True)
    if check and result.returncode != 0:
        raise Failed(f"{' '.join(command[:4])} ... exited with {result.returncode}: {last_line(result)}")
    return result


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def smoe(*args, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "smoe.launcher.cli", *args], check=check)


def smoe_together(jobs: dict[str, list], at_once: bool = True) -> dict[str, subprocess.CompletedProcess]:
    """Several `smoe` commands, at once unless told otherwise (start-up dominates small runs), each
    one's output logged after."""
    if not at_once:
        return {name: smoe(*args, check=False) for name, args in jobs.items()}
    started = {}
    for name, args in jobs.items():
        command = [sys.executable, "-m", "smoe.launcher.cli", *map(str, args)]
        print("$", " ".join(command), flush=True)
        started[name] = (command, subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True))
    results, clock = {}, time.monotonic()
    for name, (command, process) in started.items():
        stdout, stderr = process.communicate()
        print(f"--- {name}:\n{stdout}{stderr}(done by {time.monotonic() - clock:.1f} s, exit {process.returncode})",
              flush=True)
        results[name] = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    return results


def by_path(choices: dict) -> str:
    """{"1": "grouped", "2": "grouped", "3": "sorted"} -> "grouped k 1-2, sorted k 3"."""
    runs = []
    for k, path in sorted((int(k), path) for k, path in choices.items()):
        if runs and runs[-1][0] == path and runs[-1][2] == k - 1:
            runs[-1][2] = k
        else:
            runs.append([path, k, k])
    return ", ".join(f"{path} k {first}" + (f"-{last}" if last > first else "") for path, first, last in runs)


# --- the parts ------------------------------------------------------------------------------------

def install(ctx: Context) -> str:
    """The carried wheels into the check's own folder (on PYTHONPATH for every later part): no
    index, no dependency resolution, nothing written outside the work folder."""
    if ctx.wheels is None:
        raise Skip("no --wheels: uses what is installed")
    wheels = sorted(ctx.wheels.glob("*.whl"))
    if not wheels:
        raise Failed(f"{ctx.wheels} holds no wheels: build them with bash scripts/gpu-wheels.sh {ctx.wheels}")
    site = Path(os.environ["GPU_CHECK_SITE"])
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
         "--disable-pip-version-check", "--target", site, *wheels])
    ctx.figure("wheels", [w.name for w in wheels])
    return f"{len(wheels)} wheels from {ctx.wheels}"


def environment(ctx: Context) -> str:
    """torch sees the device; smoe (this checkout), DeepSpeed (on this device's accelerator) and the
    rest import; the GPU and the versions, for the summary's first line."""
    import datetime
    import importlib
    import platform

    import torch

    if ctx.device == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise Failed(f"torch {torch.__version__} ({built}) sees no CUDA GPU: check nvidia-smi and "
                     f"CUDA_VISIBLE_DEVICES, or run the CPU mode (--cpu); {INSTALL}")
    imported, missing = {}, {}
    for name in (*NEEDED, *NEEDED_BY_SOME):
        try:
            imported[name] = importlib.import_module(name)
        except Exception as error:  # an ImportError, or DeepSpeed failing to set up its accelerator
            missing[name] = f"{name} ({type(error).__name__}: {error})"
    if set(missing) & set(NEEDED):
        raise Failed("cannot import " + "; ".join(missing.values()) + f": {INSTALL}")
    from deepspeed.accelerator import get_accelerator

    from smoe.launcher.bench.infer import device_name

    if Path(imported["smoe"].__file__).resolve().parent != REPO:
        raise Failed(f"smoe imports from {Path(imported['smoe'].__file__).parent}, not this checkout ({REPO})")
    if get_accelerator().device_name() != ctx.device:
        raise Failed(f"DeepSpeed chose the {get_accelerator().device_name()} accelerator, not {ctx.device}: "
                     "check DS_ACCELERATOR and the deepspeed install")
    versions = {name: getattr(imported.get(name), "__version__", "cannot import") for name in
                ("deepspeed", "transformers", "datasets", "pytest")}
    env = {"device": device_name(torch.device(ctx.device)), "torch": torch.__version__, "cuda": torch.version.cuda,
           **versions, "python": platform.python_version(), "missing": list(missing.values()),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "imported_from": {name: str(Path(module.__file__).parent.parent) for name, module in imported.items()}}
    if ctx.device == "cuda":
        env.update(memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                   capability="%d.%d" % torch.cuda.get_device_capability(0), gpu_count=torch.cuda.device_count())
    for key, value in env.items():
        ctx.figure(key, value)
    where = (f"{env['device']} ({env['memory_gib']} GiB, compute capability {env['capability']}, "
             f"{env['gpu_count']} visible)" if ctx.device == "cuda" else env["device"])
    return (f"{where}; torch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}, transformers "
            f"{env['transformers']}, datasets {env['datasets']}, Python {env['python']}"
            + "".join(f"; cannot import {m}: the parts that need it fail" for m in missing.values()))


def relative_error(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def ep_exchange(ctx: Context) -> str:
    """model/expert_parallel.py's exchange through a one-rank expert-parallel group (NCCL on a GPU,
    gloo on the CPU), forward and backward, against the single-rank reference loop, in fp32 and
    bf16 at every k; then the 2-rank GPU test where two GPUs are visible."""
    import deepspeed
    import deepspeed.comm as dist
    import torch
    from deepspeed.utils import groups

    from smoe.launcher.runtime.distributed import free_port
    from smoe.model import MoEConfig, SMoE, init_expert_parallel
    from smoe.model.dispatch import reference_combine, scaled
    from smoe.model.expert_parallel import expert_parallel_combine

    backend = "nccl" if ctx.device == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    device = torch.device(ctx.device, 0) if ctx.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    ep_rank = init_expert_parallel(1)
    group = groups._get_expert_parallel_group("ep_size_1")
    ctx.figure("backend", torch.distributed.get_backend(group))
    if dist.get_world_size(group=group) != 1 or ep_rank != 0:
        raise Failed(f"the expert-parallel group has {dist.get_world_size(group=group)} ranks, this is rank {ep_rank}")

    shape = ctx.sizes["exchange"]
    # The same tolerance as the GPU tier's path comparisons: a few units of roundoff of each dtype.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
    worst = {}
    for dtype, limit in tolerance.items():
        config = MoEConfig(shape["d_model"], shape["d_ff"], shape["num_experts"], 1, dropout=0.0, seed=0)
        layer = SMoE(config).to(device, dtype)
        experts = layer.local_experts
        named = [(f"expert {i} {n}", p) for i, expert in enumerate(experts) for n, p in expert.named_parameters()]
        params = [p for _, p in named]
        names = ["output", "input gradient", *(n for n, _ in named)]
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape["tokens"], shape["d_model"], generator=generator).to(device, dtype)
        grad_y = torch.randn(x.shape, generator=generator).to(device, dtype)

        def forward_backward(combine):
            x_TD = x.clone().requires_grad_()
            routes = scaled(layer.router(x_TD, None), config.combine_scale)
            y_TD = combine(experts, x_TD, routes)
            return [y_TD, *torch.autograd.grad(y_TD, [x_TD, *params], grad_y)]

        def exchange(experts, x_TD, routes):
            return expert_parallel_combine(experts, x_TD, routes, config.num_experts, group, ep_rank)

        name = str(dtype).removeprefix("torch.")
        errors = {}
        for k in shape["ks"]:
            layer.set_top_k(k)
            by_tensor = [relative_error(g, w) for g, w in zip(forward_backward(exchange),
                                                              forward_backward(reference_combine))]
            errors[k] = max(by_tensor)
            if not errors[k] <= limit:
                worst_name = names[by_tensor.index(errors[k])]
                raise Failed(f"{name} k={k}: the exchange's {worst_name} is off the reference by {errors[k]:.2e} "
                             f"relative (at most {limit:g})")
        worst[name] = max(errors.values())
        ctx.figure(f"max_relative_error_{name}", worst[name])
    dist.destroy_process_group()

    if ctx.device == "cpu":
        two = "two ranks: the CPU suite's gloo tests (tests/model/test_parallel.py)"
    elif torch.cuda.device_count() < 2:
        two = "two ranks: skipped, one GPU"
    else:
        result = run([sys.executable, "-m", "pytest", "tests/gpu/test_gpu_train.py", "-q", "-p", "no:cacheprovider",
                      "-k", "two_ranks_on_two_gpus"], check=False)
        if result.returncode != 0:
            raise Failed(f"the 2-rank GPU test failed: {last_line(result)}")
        two = "two ranks on two GPUs: passed"
    ctx.figure("two_ranks", two)
    ks = ",".join(map(str, shape["ks"]))
    return (f"{ctx.figures['backend']}, 1 rank, k {ks}: output and gradients within "
            + ", ".join(f"{error:.1e} ({name})" for name, error in worst.items()) + f" of the reference; {two}")


def write_corpus(path: Path, size: int) -> Path:
    """Bytes a model can learn: a few words in random order (no data set needs fetching)."""
    import random

    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"<page>", b"</page>\n"]
    generator = random.Random(0)
    text = b"".join(generator.choice(words) for _ in range(size // 4))
    path.write_bytes(text[:size])
    return path


def losses(run_dir: Path) -> list[float]:
    from smoe.launcher.bench.runs import scalars

    values = [value for _, value in sorted(scalars(run_dir, "train/loss").items())]
    if not values or not all(math.isfinite(v) for v in values):
        raise Failed(f"{run_dir.name}: train/loss is {values or 'missing'}")
    return values


def eval_rows(path: Path) -> dict[int, float]:
    rows = {row["k"]: row["valid_bpc"] for row in json.loads(path.read_text())["rows"]}
    if not rows or not all(math.isfinite(v) for v in rows.values()):
        raise Failed(f"{path.name}: valid BPC {rows}")
    return rows


def train_eval(ctx: Context) -> str:
    """`smoe train dispatch=auto` in bf16 and `smoe eval` of that run; the same run evaluated as if
    `auto` had chosen grouped everywhere (eval runs fp32, where grouped may not run: it must fall
    back, not raise); and `dispatch=grouped` through real bf16 training steps."""
    corpus = write_corpus(ctx.work / "corpus.txt", ctx.sizes["corpus_bytes"])
    ds_config = ctx.work / "bf16.json"
    ds_config.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
                                     "steps_per_print": 1_000_000, "wall_clock_breakdown": False}))
    common = ["--preset", "tiny", "--data-file", corpus, *ctx.sizes["train"], f"ds_config={ds_config}"]
    runs = {path: ctx.work / "runs" / path for path in ("auto", "grouped")}
    # One after the other on a GPU: the auto run times the paths when it starts, and a run beside it
    # on the same GPU would change what it measures (the CPU mode's tiny runs need not time well).
    trained = smoe_together({path: ["train", "--out", run_dir, *common, f"dispatch={path}"]
                             for path, run_dir in runs.items()}, at_once=ctx.device == "cpu")
    if trained["auto"].returncode != 0:
        raise Failed(f"smoe train dispatch=auto exited with {trained['auto'].returncode}: {last_line(trained['auto'])}")
    auto_losses = losses(runs["auto"])
    choices = json.loads((runs["auto"] / "dispatch.json").read_text())
    ctx.figure("auto_choices", choices)
    ctx.figure("auto_loss", [auto_losses[0], auto_losses[-1]])

    eval_ks = next(o for o in ctx.sizes["train"] if o.startswith("eval_ks=")).split("=")[1]
    as_grouped = ctx.work / "runs" / "auto-chose-grouped"
    shutil.copytree(runs["auto"], as_grouped)
    (as_grouped / "dispatch.json").write_text(json.dumps({k: "grouped" for k in choices}))
    evaluated = smoe_together({name: ["eval", run_dir, "--k", eval_ks, "--json", ctx.work / f"eval-{name}.json"]
                               for name, run_dir in (("auto", runs["auto"]), ("grouped", as_grouped))})
    for name, result in evaluated.items():
        if result.returncode != 0:
            raise Failed(f"smoe eval of the run {'as it chose' if name == 'auto' else 'with grouped chosen'} exited "
                         f"with {result.returncode}: {last_line(result)}")
    auto_bpc = eval_rows(ctx.work / "eval-auto.json")
    ctx.figure("eval_valid_bpc", auto_bpc)
    grouped_bpc = eval_rows(ctx.work / "eval-grouped.json")
    difference = max(abs(grouped_bpc[k] - auto_bpc[k]) for k in auto_bpc)
    ctx.figure("eval_grouped_choice_difference", difference)
    if difference > 1e-3:  # every path computes the same function: only float rounding differs
        raise Failed(f"evaluated with grouped chosen, the valid BPC differs from the run's own by {difference:.2e}")

    grouped = trained["grouped"]
    if grouped.returncode != 0 and GROUPED_REFUSED in grouped.stderr + grouped.stdout:
        grouped_note = f"dispatch=grouped refused here ({last_line(grouped)[:120]})"
    elif grouped.returncode != 0:
        raise Failed(f"smoe train dispatch=grouped exited with {grouped.returncode}: {last_line(grouped)}")
    else:
        steps = [line for line in grouped.stdout.splitlines() if line.startswith("step ") and " k " in line]
        if not steps or not all("(grouped)" in line for line in steps):
            raise Failed(f"dispatch=grouped logged steps that ran another path: {steps[:2]}")
        grouped_losses = losses(runs["grouped"])
        ctx.figure("grouped_loss", [grouped_losses[0], grouped_losses[-1]])
        grouped_note = (f"grouped trained {len(grouped_losses)} logged steps, loss {grouped_losses[0]:.3f} -> "
                        f"{grouped_losses[-1]:.3f}")
    largest = max(auto_bpc)
    return (f"auto (bf16) chose {by_path(choices)}; loss {auto_losses[0]:.3f} -> {auto_losses[-1]:.3f}; eval valid "
            f"{auto_bpc[largest]:.3f} BPC at k {largest}; eval with grouped chosen: same BPC (max diff "
            f"{difference:.1e}); {grouped_note}")


def export_infer(ctx: Context) -> str:
    """`smoe export` of the GPU-trained run; the export loaded on the device without smoe, DeepSpeed
    or datasets (scripts/gpu_check_bare.py), its logits there against the CPU's at every k and a
    bf16 forward; `smoe bench infer --device` with a latency budget."""
    run_dir = ctx.work / "runs" / "auto"
    if not (run_dir / "checkpoints" / "latest").is_file():
        raise Skip("needs the run that train-eval trains, and it has none")
    sizes = ctx.sizes["export"]
    exported = ctx.work / "export"
    shutil.rmtree(exported, ignore_errors=True)
    speed = ["--ks", sizes["ks"], "--batch", sizes["batch"], "--length", sizes["length"], "--repeats", sizes["repeats"]]
    smoe("export", run_dir, exported, *speed)

    bare_json = ctx.work / "bare.json"
    # -I: no PYTHONPATH (where the check installed DeepSpeed and datasets), no user site, and not
    # this checkout's folder: only what is installed beside torch.
    run([sys.executable, "-I", HERE / "gpu_check_bare.py", exported, "--device", ctx.device, "--json", bare_json],
        cwd=ctx.work)
    bare = json.loads(bare_json.read_text())
    ctx.figure("bare", bare)
    if bare["imported"]:
        raise Failed(f"loading the export imported {bare['imported']}")
    worst = max(bare["device_vs_cpu"].values())
    if worst > 1e-3:
        raise Failed(f"the export's logits on {ctx.device} differ from the CPU's by {worst:.2e} relative")
    if not bare["bf16_finite"]:
        raise Failed(f"the export loaded in bf16 on {ctx.device} gives non-finite logits")

    infer_json = ctx.work / "infer.json"
    smoe("bench", "infer", exported, "--device", ctx.device, *speed, "--budget-ms", sizes["budget_ms"],
         "--json", infer_json)
    infer = json.loads(infer_json.read_text())
    ctx.figure("infer", infer)
    batch1 = {row["k"]: row["latency_ms"] for row in infer["rows"] if row["batch"] == 1}
    large = {row["k"]: row["tokens_per_s"] for row in infer["rows"] if row["batch"] > 1}
    choice = infer["choice"]
    return (f"bare load on {ctx.device} ({bare['class']}, without {', '.join(bare['blocked'])}): logits within "
            f"{worst:.1e} of the CPU's at k 1-{len(bare['device_vs_cpu'])}, bf16 finite; bench infer: batch 1 "
            + ", ".join(f"k {k} {ms:.2f} ms" for k, ms in batch1.items())
            + f"; batch {sizes['batch']} " + ", ".join(f"k {k} {tps:,.0f} tok/s" for k, tps in large.items())
            + f"; best k under {choice['budget']:g} ms: {choice['k']}")


def layer_bench(ctx: Context) -> str:
    """`smoe bench layer` once per dispatch path (auto and each fixed one) at the paper's sizes in
    bf16: dense, stock DeepSpeed MoE and ours at every k, time and peak memory; written to the output
    folder as layer-bench.json and layer-bench.md."""
    from smoe.launcher.bench import layer

    sizes = ctx.sizes["layer"]
    records, refused = [], {}
    for path in PATHS:
        json_file = ctx.work / f"layer-{path}.json"
        args = SimpleNamespace(sizes=sizes["sizes"], ks=sizes["ks"], tokens=sizes["tokens"], experts=sizes["experts"],
                               dropout=0.1, repeats=sizes["repeats"], threads=os.cpu_count() or 2, dispatch=path,
                               device=ctx.device, dtype="bf16", no_memory=not sizes["memory"], ep=False,
                               json=str(json_file))
        try:
            layer.run(args)
        except ValueError as error:
            if path != "grouped" or GROUPED_REFUSED not in str(error):
                raise
            refused[path] = str(error).splitlines()[0]
            continue
        for record in json.loads(json_file.read_text()):
            if path == "auto" or record["method"] == "smoe":  # dense and DeepSpeed once, from the first run
                tokens_per_s = sizes["tokens"] / record["median_ms"] * 1e3
                records.append({**record, "dispatch": path, "tokens_per_s": tokens_per_s})
        ctx.figure("paths_done", [p for p in PATHS[:PATHS.index(path) + 1] if p not in refused])
    (ctx.out / "layer-bench.json").write_text(json.dumps({"tokens": sizes["tokens"], "experts": sizes["experts"],
                                                          "refused": refused, "records": records}, indent=1))
    (ctx.out / "layer-bench.md").write_text(layer_markdown(records, sizes, ctx.device, refused))
    ks = [int(k) for k in sizes["ks"].split(",")]
    shown = {ks[0], ks[len(ks) // 2], ks[-1]}  # the headline's ks; layer-bench.md has them all
    ours = [r for r in records if r["method"] == "smoe" and r["dispatch"] == "auto" and r["k"] in shown]
    stock = {(r["size"], r["k"]): r for r in records if r["method"] == "deepspeed"}
    return (f"{len(records)} rows ({', '.join(p for p in PATHS if p not in refused)}"
            + (f"; grouped refused: {refused['grouped'][:80]}" if refused else "") + "); ours (auto) vs dense: "
            + ", ".join(f"{r['size']} k {r['k']} {r['ratio_to_dense']:.2f}x" for r in ours)
            + "; vs stock DeepSpeed: " + ", ".join(
                f"{r['size']} k {r['k']} {r['median_ms'] / stock[r['size'], r['k']]['median_ms']:.2f}x"
                for r in ours) + " (layer-bench.md)")


def layer_markdown(records: list[dict], sizes: dict, device: str, refused: dict) -> str:
    lines = [f"# Layer benchmark: {sizes['tokens']} tokens, {sizes['experts']} experts, bf16, forward+backward, "
             f"median of {sizes['repeats']}, on {device}", "",
             "Each time's ratio is to the dense MLP timed in the same k group of the same run (one run per "
             "path; its dense time in brackets); peak memory is the allocator's peak above what was allocated "
             "before the pass (a GPU), '-' where not measured.", "",
             "| size | k | method | path | median ms | tokens/s | vs dense (dense ms) | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    order = {"dense": 0, "deepspeed": 1, "smoe": 2}
    for r in sorted(records, key=lambda r: (r["size"], r["k"], order[r["method"]], PATHS.index(r["dispatch"]))):
        path = "-" if r["method"] != "smoe" else (f"auto: {r['path']}" if r["dispatch"] == "auto" else r["path"])
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        dense_ms = f"{r['median_ms'] / r['ratio_to_dense']:.2f}" if r["ratio_to_dense"] else "-"
        lines.append(f"| {r['size']} | {r['k']} | {r['method']} | {path} | {r['median_ms']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['ratio_to_dense']:.2f} ({dense_ms}) | {peak} |")
    lines += [f"\n{path}: refused ({reason})" for path, reason in refused.items()]
    return "\n".join(lines) + "\n"


def test_counts(junit: Path) -> tuple[dict, list[str], set[str]]:
    """Passed / failed / skipped, the failures' first lines, and the reasons for skips, from pytest's XML."""
    counts, failures, reasons = {"passed": 0, "failed": 0, "skipped": 0}, [], set()
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            message = (bad.get("message") or (bad.text or "").strip() or "failed").splitlines()[0]
            failures.append(f"{case.get('name')}: {message[:200]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reasons.add((case.find("skipped").get("message") or "").removeprefix("Skipped: ")[:200])
        else:
            counts["passed"] += 1
    return counts, failures, reasons


def gpu_tests(ctx: Context) -> str:
    """The GPU tier, ``python -m pytest tests/gpu``: bf16 resume, fp16 + ZeRO-2, every method, every
    dispatch path against the reference loop, host syncs per step (every test skips without CUDA)."""
    junit = ctx.work / "junit.xml"
    command = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rfE", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    print("$", " ".join(command), flush=True)
    pytest = subprocess.Popen(command, cwd=REPO)  # its output straight into the log
    try:
        returncode = pytest.wait()
    except KeyboardInterrupt:  # the part's time limit: pytest, interrupted too, writes its report first
        pytest.wait(timeout=10)
        if junit.is_file():
            ctx.figure("tests_before_the_limit", test_counts(junit)[0])
        raise
    if not junit.is_file():
        raise Failed(f"pytest wrote no report (exit {returncode}): see the log")
    counts, failures, reasons = test_counts(junit)
    ctx.figure("tests", counts)
    ctx.figure("failures", failures)
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts["failed"] or returncode not in (0, 5):
        raise Failed(summary + (f"; first: {failures[0]}" if failures else f"; pytest exited {returncode}"))
    if not counts["passed"]:
        raise Skip(f"{summary}: {'; '.join(sorted(reasons))}")
    return summary + (f" ({'; '.join(sorted(reasons))})" if reasons else "")


def step_bench(ctx: Context) -> str:
    """scripts/gpu_bench.py: a training step of the paper's Transformer-XL, dense vs SMoE-Dropout."""
    bench_json = ctx.work / "step-bench.json"
    run([sys.executable, HERE / "gpu_bench.py", *ctx.sizes["step_bench"], "--json", bench_json])
    report = json.loads(bench_json.read_text())
    ctx.figure("step_bench", report)
    rows = report["rows"]

    def peak(row):
        return "" if row["peak_gib"] is None else f", {row['peak_gib']:.2f} GiB"

    return (f"dense {rows[0]['s_per_step']:.4f} s/step{peak(rows[0])}; "
            + "; ".join(f"k {r['k']} ({r['dispatch']}) {r['vs_dense']:.2f}x dense{peak(r)}" for r in rows[1:]))


# The plan, in order: what the issue asks of one GPU first, the open-ended GPU tier last (it gets
# what is left of the budget). A failed install or environment stops the check.
PARTS = [
    Part("install", 90, "pip install --no-deps the carried wheels (--wheels DIR) into the check's folder", install),
    Part("environment", 60, "torch sees the device; smoe (this checkout), DeepSpeed, datasets, transformers import",
         environment),
    Part("ep-exchange", 90, "the expert-parallel exchange over NCCL, world size 1, forward+backward vs the reference "
                            "(+ the 2-rank GPU test on 2+ GPUs)", ep_exchange),
    Part("train-eval", 180, "smoe train dispatch=auto (bf16), smoe eval of it and of a grouped choice; "
                            "dispatch=grouped through training steps", train_eval),
    Part("export-infer", 150, "smoe export of that run, loaded on the device without smoe; smoe bench infer "
                              "--device with a budget", export_infer),
    Part("layer-bench", 180, "smoe bench layer, paper sizes, bf16, every path and k: ours vs DeepSpeed vs dense",
         layer_bench),
    Part("step-bench", 100, "scripts/gpu_bench.py: paper Transformer-XL training step, dense vs SMoE-Dropout",
         step_bench),
    Part("gpu-tests", 300, "python -m pytest tests/gpu (the GPU tier)", gpu_tests),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=[part.name for part in PARTS])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=tuple(SIZES), required=True)
    parser.add_argument("--wheels", type=Path)
    args = parser.parse_args(argv)
    ctx = Context(args.part, args.work, args.out, args.device, args.wheels)
    part = next(part for part in PARTS if part.name == args.part)
    ctx.write("running", "")
    try:
        ctx.write("pass", part.run(ctx))
    except Skip as skip:
        ctx.write("skip", str(skip))
    except Exception as error:  # the part failed: its one line for the table, the traceback for the log
        traceback.print_exc()
        ctx.write("fail", (str(error) if isinstance(error, Failed) else f"{type(error).__name__}: {error}")[:500])
    return 0


if __name__ == "__main__":
    sys.exit(main())
