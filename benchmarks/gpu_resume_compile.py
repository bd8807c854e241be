"""Does a second process with a warm torch.compile cache train the compiled VAR blocks? (GPU, issue 18)

On the GPU ladder (2026-12-03, commit 4ed405d) every run resumed after a SIGTERM failed at its first backward with
"one of the variables needed for gradient computation has been modified by an inplace operation: [B, 130, C] bf16,
output 0 of CopyBackwards", while every fresh run of the same code trained. The resumed process differs from a fresh
one in that torch.compile's on-disk caches (FX graph and AOTAutograd) already hold its graphs. Prediction: the warm
AOTAutograd cache is the cause, so run 2 fails, and run 3 (TORCHINDUCTOR_AUTOGRAD_CACHE=0) trains. The other
difference, the RNG states a resumed run restores before its first batch, is run 4 (cold cache, RNG state set).
Result (H200, torch 2.11): runs 1-4 all train. The third difference: Lightning skips the sanity check when it
resumes, so the resumed process compiles the training graph first (runs 5-6); a fresh one validates first, under
inference_mode (run 7). Runs 5-6 train too; run 7 fails ("Inference tensors cannot be saved for backward": the
block mask cached under inference_mode, now built outside it). The resume failure itself needed the real command:
benchmarks/gpu_fit_resume.sh reproduced it and found the cause (docs/gpu_ladder.md).

Each run is a new process: the ladder's depth-4 shapes (batch 256, 130 tokens, width 256), bf16 autocast, blocks
compiled as `trainer.compile: true` does, two validation batches (eval, no_grad) as Lightning's sanity check, then
3 training steps with fused AdamW. Prints a table; writes $OUT/resume_compile.json.

Usage: python benchmarks/gpu_resume_compile.py [DEPTH]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(depth: int) -> None:
    import torch

    from var_lab.models.var import VAR

    torch.manual_seed(0)
    patch_nums = (1, 2, 3, 4, 6, 8)
    L = sum(p * p for p in patch_nums)
    var = VAR(num_classes=10, depth=depth, patch_nums=patch_nums, vocab_size=1024, z_channels=16).cuda()
    for block in var.blocks:
        block.compile_teacher_forcing(dynamic=False)
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, fused=True)
    B = 256

    def batch():
        return (
            torch.randint(0, 10, (B,), device="cuda"),
            torch.randn(B, L - 1, 16, device="cuda"),
            torch.randint(0, 1024, (B, L), device="cuda"),
        )

    if os.environ.get("RC_NO_EVAL") != "1":  # a fresh run's sanity check; Lightning skips it when it resumes
        var.eval()
        grad_off = torch.inference_mode() if os.environ.get("RC_INFERENCE") == "1" else torch.no_grad()
        with grad_off, torch.autocast("cuda", torch.bfloat16):
            for _ in range(2):
                labels, x, _ = batch()
                var(labels, x)
    if os.environ.get("RC_SET_RNG") == "1":  # what a resumed run's on_train_start does (restore_rng_states)
        torch.set_rng_state(torch.get_rng_state())
        torch.cuda.set_rng_state_all(torch.cuda.get_rng_state_all())
    var.train()
    losses = []
    for _ in range(3):
        labels, x, target = batch()
        with torch.autocast("cuda", torch.bfloat16):
            logits = var(labels, x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 1024), target.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    print(json.dumps({"losses": losses}))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return 0
    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    repo = Path(__file__).resolve().parent.parent
    runs = [
        ("1 cold cache", {}),
        ("2 warm cache", {}),
        ("3 warm, TORCHINDUCTOR_AUTOGRAD_CACHE=0", {"TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}),
        ("4 cold cache (new dir), RNG state set", {"RC_SET_RNG": "1", "TORCHINDUCTOR_CACHE_DIR": cache + "_b"}),
        ("5 cold, no eval first (as a resume)", {"RC_NO_EVAL": "1", "TORCHINDUCTOR_CACHE_DIR": cache + "_c"}),
        ("6 warm, no eval first (as a resume)", {"RC_NO_EVAL": "1"}),
        ("7 cold, eval in inference_mode first", {"RC_INFERENCE": "1", "TORCHINDUCTOR_CACHE_DIR": cache + "_d"}),
    ]
    if os.environ.get("RC_ONLY_NEW") == "1":
        runs = runs[:1] + runs[4:]
    rows = []
    for name, extra in runs:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(repo), **extra}
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(depth)], env=env, capture_output=True, text=True, timeout=300
        )
        seconds = time.perf_counter() - t0
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        error = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        rows.append({"run": name, "rc": proc.returncode, "seconds": round(seconds, 1),
                     "losses": json.loads(lines[-1])["losses"] if lines else None, "error": error})  # fmt: skip
        (out / f"child_{len(rows)}.err").write_text(proc.stderr[-20000:])
    (out / "resume_compile.json").write_text(json.dumps({"depth": depth, "rows": rows}, indent=2))
    import torch

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, depth {depth}")
    for r in rows:
        print(f"{r['run']:42s} rc={r['rc']}  {r['seconds']:6.1f} s  {r['losses'] or ''}  {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
