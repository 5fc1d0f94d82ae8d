#!/bin/bash
# Sourced by the device scripts: installs the wheels of benchmarks/device/wheels.sh into a
# private folder (not over the machine's torch), copies the library beside them, and exports
# the offline environment.  Usage: source benchmarks/device/env.sh [WHEELS]    # default .whl
wheels="${1:-.whl}"
site=/tmp/massact-site
out="${OUT:-/tmp/massact-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl || exit 3
mkdir -p "$site/massact_nn"
cp -r massact_nn/. "$site/massact_nn/" && cp -r tracing "$site/massact_nn/tracing" \
    && cp -r viz "$site/massact_nn/viz"
export PYTHONPATH="$site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
