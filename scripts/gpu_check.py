#!/usr/bin/env python3
"""The one-GPU check: every part that runs on one GPU, each in its own process under its own time
limit, then one summary table. Run it as ``bash scripts/gpu-check.sh [OPTIONS]`` (see --help).

Each part (scripts/gpu_check_parts.py) gets the smaller of its own limit and what is left of the
budget; a part past its limit is interrupted (then killed with everything it started) and reported
failed, and the next part runs. A failed `environment` part (no GPU, a missing package) skips the
rest. The output folder receives at most 5 files, so that it comes back whole from a lent device:
gpu-check.md (the table), gpu-check.json (every part's status, seconds and figures),
gpu-check.log (every part's full output), layer-bench.json and layer-bench.md.

Exit status: 0 when no part failed, 1 when one did, 2 when the environment is not ready.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check_parts import PARTS, REPO, SIZES

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BUDGET_S = 540  # the whole check, installs included: a lent device runs one command for at most 600 s
LEAST_S = 20  # with less than this left of the budget, a part is skipped
FATAL = ("install", "environment")  # nothing else can run when one of these failed


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [part.name for part in PARTS]
    parser = argparse.ArgumentParser(prog="bash scripts/gpu-check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", default=os.environ.get("GPU_CHECK_DEVICE") == "cpu",
                        help="every part on the CPU at tiny sizes (gloo for NCCL), to debug the check without "
                             "a GPU (also GPU_CHECK_DEVICE=cpu)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--wheels", type=Path, default=os.environ.get("WHEELS") or None,
                        help="install these wheels first (pip --no-index --no-deps, into the check's own folder): "
                             "DeepSpeed, datasets and what the GPU image lacks, built by scripts/gpu-wheels.sh "
                             "(also WHEELS=DIR)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check"),
                        help="the output folder (default: $OUT, else ./gpu-check)")
    parser.add_argument("--budget", type=int, default=BUDGET_S,
                        help=f"seconds for the whole check (default {BUDGET_S})")
    parser.add_argument("--only", help=f"comma list of parts to run, of {', '.join(names)}")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="another time limit for one part (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (runs, exports) and say where")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.cpu else "cuda"
    only = names if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; the parts are {', '.join(names)}")
    args.only = only
    args.limits = {}
    for text in args.limit:
        name, _, seconds = text.partition("=")
        if name not in names or not seconds.isdigit():
            parser.error(f"--limit {text}: give PART=SECONDS with PART one of {', '.join(names)}")
        args.limits[name] = int(seconds)
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels}: no such folder; build it with bash scripts/gpu-wheels.sh {args.wheels}")
    return args


def plan(args) -> list:
    """(part, its own limit) in order: install only with --wheels."""
    return [(part, args.limits.get(part.name, part.limit_s)) for part in PARTS
            if part.name in args.only and (part.name != "install" or args.wheels is not None)]


def part_env(site: Path, work: Path, device: str) -> dict:
    """Every part's environment: the check's own folder first on PYTHONPATH (this checkout's smoe,
    the wheels), DeepSpeed on the device's accelerator, nothing fetched, no launcher variables."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(site / "bin"), env.get("PATH", "")]), GPU_CHECK_SITE=str(site),
               DS_ACCELERATOR=device, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(work / "hf"), MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def stop(process: subprocess.Popen) -> None:
    """Interrupt the part and everything it started (its own process group), then kill what is left."""
    for sig, wait_s in ((signal.SIGINT, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue


def run_part(part, limit: int, args, work: Path, env: dict, log) -> dict:
    command = [sys.executable, str(Path(__file__).with_name("gpu_check_parts.py")), part.name, "--work", str(work),
               "--out", str(args.out), "--device", args.device]
    if args.wheels is not None:
        command += ["--wheels", str(args.wheels.resolve())]
    print(f"\n===== {part.name} (limit {limit} s): {part.what}", flush=True)
    part_log = work / "logs" / f"{part.name}.log"
    started = time.monotonic()
    with open(part_log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        stop(process)  # also whatever the part left running
    seconds = time.monotonic() - started
    result_file = work / "results" / f"{part.name}.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"figures": {}}
    if timed_out:
        result.update(status="fail", headline=f"stopped at its time limit ({limit} s); got as far as: "
                                              f"{json.dumps(result['figures'])[:300]}")
    elif result.get("status") not in ("pass", "fail", "skip"):
        result.update(status="fail", headline=f"exited with {process.returncode} before reporting (see the log)")
    result.update(part=part.name, seconds=round(seconds, 1), limit_s=limit)
    text = part_log.read_text(errors="replace")
    log.write(f"\n===== {part.name}: {result['status']} in {seconds:.0f} s\n{text}")
    log.flush()
    if result["status"] == "fail":
        print("\n".join(text.splitlines()[-30:]))
    print(f"{part.name}: {result['status'].upper()} in {seconds:.0f} s: {result['headline']}", flush=True)
    return result


def summary(results: list[dict], environment: dict, args, seconds: float) -> tuple[str, bool]:
    failed = [r["part"] for r in results if r["status"] == "fail"]
    where = environment["headline"] if environment.get("status") == "pass" else "environment not checked"
    lines = ["## smoe one-GPU check" + (" (CPU mode, tiny sizes)" if args.device == "cpu" else ""), "",
             f"{where}; {environment.get('figures', {}).get('date', '')}", "",
             "| part | result | s | key figures |", "|---|---|---|---|"]
    for r in results:
        headline = r["headline"].replace("|", "/")
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']:.0f} | {headline} |")
    counts = {status: sum(r["status"] == status for r in results) for status in ("pass", "fail", "skip")}
    lines += ["", f"**{'FAIL' if failed else 'PASS'}**: {counts['pass']} passed, {counts['fail']} failed, "
                  f"{counts['skip']} skipped, in {seconds:.0f} s of a {args.budget} s budget"
              + (f"; failed: {', '.join(failed)} (gpu-check.log has their output)" if failed else "")]
    return "\n".join(lines) + "\n", not failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    steps = plan(args)
    if args.dry_run:
        print(f"gpu-check on {args.device} ({'tiny sizes' if args.device == 'cpu' else 'the paper sizes, bf16'}), "
              f"budget {args.budget} s, output {args.out}/:")
        for part, limit in steps:
            print(f"  {part.name:<13} {limit:>4} s  {part.what}")
        print(f"sizes: {json.dumps(SIZES[args.device])}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    work = Path(tempfile.mkdtemp(prefix="smoe-gpu-check."))
    site = work / "site"
    site.mkdir()
    (site / "smoe").symlink_to(REPO)  # this checkout is the `smoe` every part imports
    (work / "logs").mkdir()
    env = part_env(site, work, args.device)
    started = time.monotonic()
    results = []
    try:
        with open(args.out / "gpu-check.log", "w") as log:
            for part, limit in steps:
                left = int(args.budget - (time.monotonic() - started))
                blocker = next((r["part"] for r in results if r["part"] in FATAL and r["status"] == "fail"), None)
                if blocker or left < LEAST_S:
                    reason = f"{blocker} failed" if blocker else f"{max(left, 0)} s left of the budget"
                    results.append({"part": part.name, "status": "skip", "headline": reason, "seconds": 0.0,
                                    "limit_s": limit, "figures": {}})
                    print(f"\n{part.name}: SKIP: {reason}", flush=True)
                    continue
                results.append(run_part(part, min(limit, left), args, work, env, log))
    finally:
        if args.keep:
            print(f"\nwork folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    environment = next((r for r in results if r["part"] == "environment"), {})
    text, ok = summary(results, environment, args, time.monotonic() - started)
    (args.out / "gpu-check.md").write_text(text)
    (args.out / "gpu-check.json").write_text(json.dumps({"device": args.device, "budget_s": args.budget,
                                                         "ok": ok, "parts": results}, indent=1))
    print("\n" + text + f"(written to {args.out}/gpu-check.md)")
    if any(r["part"] in FATAL and r["status"] == "fail" for r in results):
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
