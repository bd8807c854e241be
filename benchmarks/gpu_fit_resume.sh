#!/usr/bin/env bash
# A compiled `var-lab fit` stopped by SIGTERM and resumed, on the GPU (issue 18: on the ladder every resumed compiled
# run failed at its first backward, while fresh runs trained). Depth 4 at the ladder's shapes (batch 256, 130
# tokens, width 256, flex attention, bf16, blocks compiled), a tiny random tokenizer, Fashion-MNIST 32px.
#   A   fresh run, stopped by SIGTERM after ~75 s (a last.ckpt)
#   B1  resume, warm compile cache            (the ladder's case)
#   B2  resume, cold compile cache            (is it the cache?)
#   B3  resume, warm cache, with .gpu/maskfix.patch applied (if that file is there; B1-B2 run without it)
# MODE=trace: T1, a resume under anomaly detection with the AOTAutograd graphs logged. MODE=check: R1, a resume
# after the fix, and dynamo's graph breaks in A and R1. With MODE=diagnose instead of B1-B3:
#   D1  resume under torch.autograd anomaly detection (names the forward op whose tensor was modified)
#   D2  resume with trainer.compile false
#   D3  resume, compiled, without restoring the RNG states
# carry: [".whl", ".gpu/data", ".gpu/maskfix.patch"]. Logs under $OUT; a table printed last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_bootstrap.sh >"$OUT/bootstrap.log" 2>&1 || { echo "BOOTSTRAP FAILED"; tail -5 "$OUT/bootstrap.log"; exit 1; }
mkdir -p /tmp/gpu_data && cp -u .gpu/data/*.gz /tmp/gpu_data/
fix=.gpu/maskfix.patch
[ -f "$fix" ] && patch -s -R -p1 <"$fix" && echo "fix reverted for A, B1, B2"
W=/tmp/fit_resume; rm -rf "$W"; mkdir -p "$W"
python3 - "$W" <<'PY'
import sys, yaml
w = sys.argv[1]
cfg = {
    "output_dir": f"{w}/run", "seed": 0,
    "tokenizer": {"vocab_size": 1024, "z_channels": 16, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                  "patch_nums": [1, 2, 3, 4, 6, 8], "using_sa": False, "using_mid_sa": False},
    "model": {"depth": 4, "num_classes": 10},
    "data": {"name": "fashion_mnist", "root": "/tmp/gpu_data", "resolution": 32, "batch_size": 256,
             "num_workers": 4, "limit_val": 512},
    "trainer": {"compile": True, "max_steps": 20000, "max_epochs": 100, "val_check_interval": 25,
                "limit_val_batches": 2, "checkpoint_every_n_steps": 25, "enable_progress_bar": False,
                "text_progress_every_n_steps": 25, "log_every_n_steps": 25},
    "tracking": {"tracking_uri": f"sqlite:///{w}/mlflow.db", "experiment": "fit-resume", "sample_grid_every_n_val": 0},
}
open(f"{w}/run.yaml", "w").write(yaml.safe_dump(cfg, sort_keys=False))
PY
rows=()
phase() {  # name seconds cache_dir [python prelude before var-lab fit] [extra fit options]
    TORCHINDUCTOR_CACHE_DIR=$3 timeout -s TERM -k 40 "$2" python3 -c "${4:-pass}
import sys
from var_lab.cli import main
sys.exit(main(sys.argv[1:]))" fit --config "$W/run.yaml" ${5:-} >"$OUT/$1.log" 2>&1
    local rc=$? steps err
    steps=$(grep -oE "step +[0-9]+" "$OUT/$1.log" | tail -1)
    err=$(grep -E "^[A-Za-z]*(Error|Exception)" "$OUT/$1.log" | tail -1 | cut -c1-150)
    rows+=("$(printf '%-4s rc=%-3s last progress: %-12s %s' "$1" "$rc" "${steps:-none}" "$err")")
    ls "$W/run/checkpoints" >"$OUT/$1.ckpts" 2>&1
    [ -f "$W/run/FAILED" ] && cp "$W/run/FAILED" "$OUT/$1.FAILED"
    echo "${rows[-1]}"
}
if [ "${MODE:-}" = check ]; then TORCH_LOGS=graph_breaks phase A 75 "$W/c1"; else phase A 75 "$W/c1"; fi
if [ "${MODE:-}" = check ]; then  # after the fix: the resume trains; where dynamo breaks the graph, fresh and resumed
    TORCH_LOGS=graph_breaks phase R1 60 "$W/c1"
    grep -h -A3 "Graph break" "$OUT/A.log" | cut -c1-220 | sort | uniq -c | sort -rn | head -8
    echo "--- resumed:"; grep -h -A3 "Graph break" "$OUT/R1.log" | cut -c1-220 | sort | uniq -c | sort -rn | head -8
elif [ "${MODE:-}" = trace ]; then  # T1: anomaly detection with warnings kept, and the AOTAutograd graphs logged
    TORCH_LOGS=aot_graphs phase T1 100 "$W/c1" "import torch, warnings
torch.autograd.set_detect_anomaly(True)
warnings.simplefilter('always')
warnings.filterwarnings = warnings.simplefilter = lambda *a, **k: None"
    grep -n "copy_" "$OUT/T1.log" | cut -c1-200 | head -20
elif [ "${MODE:-}" = diagnose ]; then
    phase D1 90 "$W/c1" "import torch; torch.autograd.set_detect_anomaly(True)"
    phase D3 60 "$W/c1" "import var_lab.modules.var as m; m.restore_rng_states = lambda states: None"
    phase D2 50 "$W/c1" "" "--trainer.compile false"
else
    phase B1 60 "$W/c1"
    phase B2 75 "$W/c2"
    if [ -f "$fix" ]; then patch -s -p1 <"$fix" && echo "fix applied"; phase B3 60 "$W/c1"; fi
fi
echo; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
printf '%s\n' "${rows[@]}"
