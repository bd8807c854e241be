#!/usr/bin/env bash
# One device call: the FID weights' last part joined and installed (benchmarks/gpu_bootstrap.sh), where a sample's
# time goes (benchmarks/sample_breakdown.py), then `var-lab eval` of a random-weight VAR-d16 with 50,000 samples
# against a 10,000-image reference .npz, exactly as users run it. carry [".whl", ".gpu/fid/MANIFEST",
# ".gpu/fid/part.01"] on the machine that got part.00 in the previous call. Writes under $OUT.
# Usage: bash benchmarks/gpu_call_eval.sh [BATCH] [PER_CLASS]
set -uo pipefail
export PYTHONUNBUFFERED=1
batch=${1:-256}; per_class=${2:-50}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_bootstrap.sh >"$OUT/bootstrap.log" 2>&1 || echo "BOOTSTRAP FAILED"
grep -v "^WARNING: Running pip" "$OUT/bootstrap.log"
var-lab fid-weights --check
work=$PWD/.gpu/eval; mkdir -p "$work"
python3 - "$work" <<'PY'
import sys, numpy as np, torch
from pathlib import Path
from var_lab.models import VAR, VQVAE
w = Path(sys.argv[1])
torch.manual_seed(0)
vq = VQVAE(); var = VAR(vqvae=vq, depth=16, init_adaln_gamma=0.5)
torch.save(vq.state_dict(), w / "vae.pth"); torch.save(var.state_dict(), w / "var_d16.pth")
if not (w / "ref.npz").exists():
    np.savez(w / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (10000, 256, 256, 3), dtype=np.uint8))
print("random VAR-d16, tokenizer and 10,000-image reference written")
PY
timeout 150 python3 benchmarks/sample_breakdown.py --batch-size 64 256 512 --out "$OUT/sample_breakdown.json" \
    2>&1 | grep -v -i warn | tail -6
export MLFLOW_TRACKING_URI=sqlite:///$work/mlflow.db
t0=$(date +%s.%N); var-lab eval --release-var "$work/var_d16.pth" --release-tokenizer "$work/vae.pth" --depth 16 \
    --per-class "$per_class" --batch-size "$batch" --reference-npz "$work/ref.npz" --out "$work/eval" \
    >"$OUT/eval.log" 2>"$OUT/eval.err"
rc=$?; echo "eval rc=$rc wall_s=$(python3 -c "import time; print(round(time.time() - $t0, 1))")"
grep -v -i "warn" "$OUT/eval.log" | tail -24; grep -v -i "warn\|it/s\|img/s" "$OUT/eval.err" | tail -4
cp "$work/eval/metrics.json" "$OUT/eval_metrics.json" 2>/dev/null || true
