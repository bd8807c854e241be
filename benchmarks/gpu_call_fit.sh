#!/usr/bin/env bash
# One device call: the GPU machine set up as a user would (benchmarks/gpu_bootstrap.sh), then the bare training step
# (benchmarks/train_step.py: eager, whole-model compile, regional compile) and `var-lab fit` from token shards with
# --trainer.compile true and the sqlite MLflow store (benchmarks/fit_from_tokens.py), d16 batch 64, in one call.
# Run from the repository root with carry [".whl", ".gpu/fid/MANIFEST", ".gpu/fid/part.00"]; writes under $OUT.
# Usage: bash benchmarks/gpu_call_fit.sh COMMIT [STEPS]
set -uo pipefail
export PYTHONUNBUFFERED=1 VAR_LAB_COMMIT=${1:-unknown}
steps=${2:-300}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_bootstrap.sh >"$OUT/bootstrap.log" 2>&1 || echo "BOOTSTRAP FAILED"
cat "$OUT/bootstrap.log" | grep -v "^WARNING: Running pip"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip list --format=freeze 2>/dev/null >"$OUT/image_pip_freeze.txt"
grep -i -E "^(torch|lightning|typing.extensions|protobuf|numpy|packaging|pydantic|mlflow|sqlalchemy)==" \
    "$OUT/image_pip_freeze.txt" | tr '\n' ' '; echo
work=$PWD/.gpu/work; mkdir -p "$work"
timeout 200 python3 benchmarks/train_step.py --depths 16 --variants flex flex+regional flex+compile --repeats 20 \
    --out "$OUT/train_step.json" 2>&1 | grep -v -i "warn" | tail -8
timeout 330 python3 benchmarks/fit_from_tokens.py --depth 16 --batch 64 --steps "$steps" --compile --scope block \
    --work "$work" --bare-json "$OUT/train_step.json" --bare-variant flex+compile \
    --out "$OUT/fit_e2e_compile.json" >"$OUT/fit_compile.log" 2>&1
echo "fit rc=$?"; grep -v -i "warn" "$OUT/fit_compile.log" | tail -6
