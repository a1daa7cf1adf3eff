#!/usr/bin/env bash
# The one-GPU check, in one command from anywhere in the repository, within 10 minutes on one H100:
#
#     bash scripts/gpu-check.sh                        # what is installed; results in ./gpu-check/
#     bash scripts/gpu-check.sh --wheels .gpu-wheels   # first installs the wheels of scripts/gpu-wheels.sh
#     bash scripts/gpu-check.sh --cpu                  # every part on the CPU at tiny sizes (a minute or two)
#     bash scripts/gpu-check.sh --dry-run              # the plan: parts, time limits, sizes
#
# Parts, each in its own process under its own time limit (scripts/gpu_check_parts.py): install,
# environment, ep-exchange, train-eval, export-infer, layer-bench, step-bench, gpu-tests. The table
# comes last, also in OUT/gpu-check.md (OUT: --out DIR, else $OUT, else ./gpu-check). The rest of the
# options: python3 scripts/gpu_check.py --help. Exit status: 0 pass, 1 a part failed, 2 not ready.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "$PYTHON" ]; then
    echo "gpu-check: neither python nor python3 is on PATH: install Python 3.10+ (or set PYTHON=...)" >&2
    exit 2
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
