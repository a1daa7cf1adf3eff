#!/usr/bin/env bash
# The GPU check, in one command from the repository root, in under 8 minutes on one GPU:
#
#     bash scripts/gpu-check.sh
#
# 1. checks the prerequisites (torch with CUDA and a GPU; smoe from this checkout, deepspeed,
#    datasets, transformers, tensorboard, pytest) and prints the GPU; installs nothing;
# 2. runs the GPU tier, `python -m pytest tests/gpu -q -rA` (at most PYTEST_TIMEOUT s, default 300);
# 3. runs the benchmark, scripts/gpu_bench.py: dense vs SMoE-Dropout training-step time and peak
#    memory of the paper's Transformer-XL (at most BENCH_TIMEOUT s, default 100), even if tests failed;
# 4. prints one summary table (tests by group, benchmark rows, GPU and versions) and writes it to
#    $OUT/gpu-check.md when OUT is set (with the full log and pytest's junit XML beside it), else
#    to ./gpu-check.md.
#
# Exit status: 0 when every test passed (or skipped with a reason) and the benchmark ran; 1 when
# something failed or timed out; 2 when a prerequisite is missing. PYTHON picks the interpreter.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-300}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" || exit 2
    REPORT=$OUT/gpu-check.md
else
    REPORT=./gpu-check.md
fi

# DeepSpeed picks its accelerator at import; tests/conftest.py would default it to cpu.
export DS_ACCELERATOR=cuda
export TOKENIZERS_PARALLELISM=false

WORK=$(mktemp -d "${TMPDIR:-/tmp}/smoe-gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT

section() { printf '\n===== %s\n' "$*"; }

# limited SECONDS COMMAND...: COMMAND with SIGINT after SECONDS (pytest then writes its report),
# SIGKILL 30 s later. --foreground keeps Ctrl-C working.
limited() {
    local seconds=$1
    shift
    if command -v timeout >/dev/null 2>&1; then
        timeout --foreground -s INT -k 30 "$seconds" "$@"
    else
        "$@"
    fi
}

main() {
    section "prerequisites"
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "gpu-check: no '$PYTHON' on PATH: install Python 3.10+ (or set PYTHON=...)" >&2
        return 2
    fi
    "$PYTHON" - "$WORK/env.json" "$PWD" <<'EOF' || return 2
import datetime, importlib, json, platform, sys
from pathlib import Path

INSTALL = ("install a CUDA build of torch first (pip install torch: the default Linux wheel is a CUDA build; "
           "pick the CUDA build that matches the driver), "
           "then, from the repository root, pip install -e . (deepspeed, datasets, transformers, tensorboard, "
           "safetensors) and pip install pytest")
try:
    import torch
except ImportError as error:
    sys.exit(f"gpu-check: torch does not import ({error}): {INSTALL}")
if not torch.cuda.is_available():
    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    sys.exit(f"gpu-check: torch {torch.__version__} ({built}) sees no CUDA GPU. Check nvidia-smi and "
             f"CUDA_VISIBLE_DEVICES, and {INSTALL}")
missing = []
for name in ("smoe", "deepspeed", "datasets", "transformers", "tensorboard", "safetensors", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as error:  # an ImportError, or deepspeed failing to set up its CUDA accelerator
        missing.append(f"{name} ({type(error).__name__}: {error})")
if missing:
    sys.exit("gpu-check: cannot import " + "; ".join(missing) + f". {INSTALL}")
import deepspeed, datasets, smoe, transformers
from deepspeed.accelerator import get_accelerator

repo = Path(sys.argv[2]).resolve()
if Path(smoe.__file__).resolve().parent != repo:
    sys.exit(f"gpu-check: `smoe` imports from {Path(smoe.__file__).parent}, not this checkout ({repo}): "
             "run pip install -e . here")
if get_accelerator().device_name() != "cuda":
    sys.exit(f"gpu-check: DeepSpeed chose the {get_accelerator().device_name()} accelerator, not cuda: "
             "check DS_ACCELERATOR and the deepspeed install")
props = torch.cuda.get_device_properties(0)
env = {"gpu": torch.cuda.get_device_name(0), "memory_gib": props.total_memory / 2**30,
       "capability": "%d.%d" % torch.cuda.get_device_capability(0), "gpu_count": torch.cuda.device_count(),
       "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
       "transformers": transformers.__version__, "datasets": datasets.__version__,
       "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
Path(sys.argv[1]).write_text(json.dumps(env))
print(f"torch: {env['gpu']}, {env['memory_gib']:.1f} GiB, compute capability {env['capability']}, "
      f"{env['gpu_count']} visible GPU(s)")
print(f"torch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}, transformers "
      f"{env['transformers']}, datasets {env['datasets']}, Python {env['python']}")
EOF
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | paste -sd ';' -)"
    else
        echo "nvidia-smi: not on PATH"
    fi

    section "tests: python -m pytest tests/gpu -q -rA (time limit ${PYTEST_TIMEOUT} s)"
    limited "$PYTEST_TIMEOUT" "$PYTHON" -m pytest tests/gpu -q -rA --junitxml="$WORK/junit.xml"
    local pytest_rc=$?

    section "benchmark: python scripts/gpu_bench.py (time limit ${BENCH_TIMEOUT} s)"
    limited "$BENCH_TIMEOUT" "$PYTHON" scripts/gpu_bench.py --json "$WORK/bench.json"
    local bench_rc=$?

    section "summary"
    "$PYTHON" scripts/gpu_bench.py summary --env "$WORK/env.json" --junit "$WORK/junit.xml" \
        --bench "$WORK/bench.json" --pytest-rc "$pytest_rc" --bench-rc "$bench_rc" --out "$REPORT"
    local summary_rc=$?
    if [ -n "${OUT:-}" ] && [ -f "$WORK/junit.xml" ]; then
        cp "$WORK/junit.xml" "$OUT/gpu-check-junit.xml"
    fi
    if [ "$pytest_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ] || [ "$summary_rc" -ne 0 ]; then
        return 1
    fi
    return 0
}

if [ -n "${OUT:-}" ]; then
    main 2>&1 | tee "$OUT/gpu-check.log"
    exit "${PIPESTATUS[0]}"
fi
main
