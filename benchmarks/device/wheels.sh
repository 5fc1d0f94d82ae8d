#!/bin/bash
# Download the wheels a lent accelerator machine needs to run the benchmarks offline.
#
# The machine has a CUDA build of torch and transformers but no network, no nnsight and no
# diffusers. Run this here (where the package index is reachable), then hand the folder to
# the machine with the run (`carry: [".whl"]`) and run benchmarks/device/run.sh there.
#
#   bash benchmarks/device/wheels.sh [PYTHON_VERSION] [FOLDER]    # defaults: 3.12 .whl
set -euo pipefail
py="${1:-3.12}"
dest="${2:-.whl}"
mkdir -p "$dest"
# --no-deps, and only what a lent machine lacked: it has torch, transformers, huggingface_hub,
# numpy, Pillow and safetensors, and the run may carry 64 MiB at most (with every dependency
# this is 74 MB). The versions are the ones this project tests with.
python3 -m pip download --quiet --dest "$dest" --only-binary :all: --no-deps \
    --python-version "$py" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 --platform any \
    nnsight==0.8.1 diffusers==0.42.1 greenlet pydantic pydantic_core annotated_types \
    typing_inspection importlib_metadata websocket_client zstandard
du -sh "$dest"
