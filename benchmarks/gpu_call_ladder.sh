#!/usr/bin/env bash
# One device call of the GPU ladder study (sweeps/gpu_ladder.yaml, docs/gpu_ladder.md): bootstrap, run or resume the
# sweep for at most BUDGET_S seconds, FID noise (two more eval seeds of depth 10) once depth 10 is evaluated, then
# everything a later call or this machine's owner needs goes under $OUT, and a short table is printed last.
#
#   carry: [".whl", ".gpu/data", ".gpu/fid/MANIFEST"]             call 1 (wheels, Fashion-MNIST: 50 MiB)
#          [".gpu/fid/MANIFEST", ".gpu/fid/part.0N"]               calls 2 and 3 (the FID weights arrive in parts)
#          [".whl", ".gpu/data", ".gpu/carry"]                      a call on a cold machine (the state of the last one)
#
# The sweep runs in /tmp/gpu_out (it survives between calls while the machine stays warm; a fixed absolute path, since
# the run configs and the MLflow store hold absolute paths, so a carried state is valid on any machine). When the
# machine went cold, the state packed by the last call (.gpu/carry/state.tgz.*: mlflow.db, the tokenizer's
# last.ckpt, the token cache, every finished run's folder without its checkpoints; 30-40 MiB) is unpacked first, so
# finished runs and stages are skipped; a run that was not finished then starts again (its checkpoints stayed on the
# cold machine). The timeout sends SIGTERM to the launcher, which stops the running fit after its step with a
# last.ckpt (`var-lab sweep launch` again resumes it) and cancels a running eval (run again on the next launch).
#
# Usage: bash benchmarks/gpu_call_ladder.sh COMMIT [BUDGET_S]      (BUDGET_S: whole call, default 560)
set -uo pipefail
export PYTHONUNBUFFERED=1 VAR_LAB_COMMIT=${1:-unknown}
budget=${2:-560}
t0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
elapsed() { echo $(($(date +%s) - t0)); }
source benchmarks/gpu_bootstrap.sh >"$OUT/bootstrap.log" 2>&1 || echo "BOOTSTRAP FAILED"
grep -v "^WARNING: Running pip" "$OUT/bootstrap.log" | tail -4
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
fid=yes; var-lab fid-weights --check >/dev/null 2>&1 || fid=no
echo "FID weights installed: $fid (without them each eval fails at once and runs again on the next launch)"

root=${VL_LADDER_ROOT:-/tmp/gpu_out}   # VL_LADDER_ROOT, PYTHON: for a dry run of this script on a CPU machine
# shellcheck disable=SC2206  # VL_LADDER_ARGS: extra sweep options, word-split on purpose (the CPU dry run)
sweep=(sweeps/gpu_ladder.yaml --output-root "$root" ${VL_LADDER_ARGS:-})
# The GPU image has no Fashion-MNIST: its 4 IDX files (30 MiB) travel in .gpu/data on the first call and are kept
# in /tmp/gpu_data (a fixed path, as the run configs and the token manifest record it) while the machine is warm.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${VL_LADDER_ROOT:-}" ]; then
    if [ -d .gpu/data ]; then mkdir -p /tmp/gpu_data && cp -u .gpu/data/*.gz /tmp/gpu_data/; fi
    ls /tmp/gpu_data/train-images-idx3-ubyte.gz >/dev/null 2>&1 \
        || echo "NO FASHION-MNIST: carry .gpu/data (mkdir -p .gpu/data && cp /usr/share/datasets/fashion-mnist/* .gpu/data/)"
    sweep+=(--set data.root=/tmp/gpu_data)
fi
if [ ! -f "$root/mlflow.db" ] && ls .gpu/carry/state.tgz.* >/dev/null 2>&1; then
    mkdir -p "$root" && cat .gpu/carry/state.tgz.* | tar -xzf - -C "$root" && echo "unpacked the carried state"
fi

# ---- the sweep, time-boxed (leave ~70 s for the noise check, packing and the table)
left=$((budget - $(elapsed) - 70))
if [ "$left" -gt 30 ]; then   # finished runs and stages are skipped in seconds
    echo "sweep launch for at most ${left} s"
    timeout -s TERM -k 45 "$left" var-lab sweep launch "${sweep[@]}" >"$OUT/launch.log" 2>&1
    echo "sweep launch rc=$? after $(elapsed) s"
    grep -E "^  (start|finished|failed|cancelled|skip|blocked) " "$OUT/launch.log" | cut -c1-150 | tail -24
fi

# ---- FID noise: two more seeds of depth 10, as its sweep eval ran them (same reference, cfg, samples)
d10=$root/gpu_ladder/depth=10
if [ -f "$d10/checkpoints/last.ckpt" ] && [ -f "$d10/eval/DONE" ]; then
    for seed in 1 2; do
        [ -f "$root/noise/seed$seed/metrics.json" ] && continue
        [ $(($(elapsed) + 60)) -gt "$budget" ] && break
        timeout 120 var-lab eval --checkpoint "$d10/checkpoints/last.ckpt" --num-samples 10000 --batch-size 500 \
            --cfg 1.5 --top-k 0 --top-p 0 --seed "$seed" --no-mlflow --out "$root/noise/seed$seed" \
            >"$OUT/noise_seed$seed.log" 2>&1
        echo "noise eval seed $seed rc=$?"
    done
fi

# ---- what comes back: the state (for a cold machine), the report, the summary
sweep_state() {  # finished runs without checkpoints, the tokenizer's last.ckpt, tokens, stages, the store
    local name=gpu_ladder excludes=(--exclude='*.claim*' --exclude='trainer.lock' --exclude='*/samples')
    for run in "$root/$name"/depth=*; do
        [ -d "$run" ] || continue
        excludes+=(--exclude="$name/$(basename "$run")/checkpoints")
        [ -f "$run/DONE" ] || excludes+=(--exclude="$name/$(basename "$run")")
    done
    excludes+=(--exclude="$name/tokenizer/checkpoints/epoch*")
    local paths=(mlflow.db "$name")
    for extra in mlartifacts noise; do [ -e "$root/$extra" ] && paths+=("$extra"); done
    tar -C "$root" -czf - "${excludes[@]}" "${paths[@]}"
}
if [ -f "$root/mlflow.db" ]; then
    sweep_state | split -b 15M -d - "$OUT/state.tgz."
    echo "state: $(du -ch "$OUT"/state.tgz.* | tail -1 | cut -f1) in $(ls "$OUT"/state.tgz.* | wc -l) part(s)" \
        "(to carry: mkdir -p .gpu/carry && cp FILES_AT/state.tgz.* .gpu/carry/)"
    report=$root/gpu_ladder/report
    [ -d "$report" ] && tar -C "$root/gpu_ladder" -czf "$OUT/report.tgz" report
    ${PYTHON:-python3} benchmarks/gpu_ladder_summary.py "$root" --noise "$root/noise" --out "$OUT/ladder_summary.json" \
        2>"$OUT/summary.err" || tail -3 "$OUT/summary.err"
fi
echo "call wall time $(elapsed) s"
