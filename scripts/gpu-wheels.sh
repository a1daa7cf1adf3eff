#!/usr/bin/env bash
# The wheels that scripts/gpu-check.sh --wheels DIR installs on a GPU machine that has no internet:
#
#     bash scripts/gpu-wheels.sh [DIR]          # default DIR: .gpu-wheels (git-ignored)
#
# The GPU image this project is lent (Python 3.12, torch with CUDA, transformers, tensorboard,
# safetensors, pandas, pyarrow, einops, msgpack, ninja, psutil, py-cpuinfo, ...) lacks DeepSpeed,
# datasets and the packages of theirs listed below; each is fetched at the version installed here,
# so the GPU runs what the CPU suite ran. DeepSpeed has no wheel on PyPI: it is built here, without
# its C++ ops (pure Python, any platform). Run it where pip reaches PyPI, with this project installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
DIR=${1:-.gpu-wheels}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}  # the GPU image's Python
# DeepSpeed's and datasets' own requirements that the image does not have, and theirs.
MISSING=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess)

pins=()
for name in deepspeed "${MISSING[@]}"; do
    pins+=("$name==$("$PYTHON" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' \
        "$name")") || { echo "gpu-wheels: $name is not installed here: pip install -e . first" >&2; exit 2; }
done

rm -rf "$DIR"
mkdir -p "$DIR"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${pins[@]:1}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "${pins[0]}"
ls -1 "$DIR"
du -sh "$DIR"
