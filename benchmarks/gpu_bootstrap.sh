# Source this at the start of every command on the lent GPU machine (no network there):
#     source benchmarks/gpu_bootstrap.sh || exit
# 1. installs the wheels carried in .whl/ (made here by benchmarks/gpu_wheels.sh) into .gpu/site, once per machine
#    (.gpu/ is ignored by git, so the install stays there between calls while the machine is warm), puts it and the
#    repository on PYTHONPATH, and a `var-lab` command on PATH (the same entry point as `pip install -e .`);
# 2. checks every carried wheel's requirements against what the machine has (a conflict is printed, not fatal);
# 3. when the parts of the FID Inception weights have all arrived in .gpu/fid/ (benchmarks/gpu_fid_parts.sh, one or
#    two parts per call), joins them, checks their sha256 against .gpu/fid/MANIFEST and installs the file with
#    `var-lab fid-weights --from-file`, as on the CPU.
_vl_root=$(pwd)
_vl_site=$_vl_root/.gpu/site
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    _vl_stamp=$(ls .whl/*.whl | sort | sha256sum | cut -c1-16)
    if [ "$(cat "$_vl_site/.stamp" 2>/dev/null)" != "$_vl_stamp" ]; then
        rm -rf "$_vl_site"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_vl_site" \
            .whl/*.whl || return 1
        echo "$_vl_stamp" >"$_vl_site/.stamp"
    fi
elif [ ! -f "$_vl_site/.stamp" ]; then
    echo "gpu_bootstrap: no wheels in .whl/ and none installed in .gpu/site (run benchmarks/gpu_wheels.sh here," \
        "and name .whl in carry)" >&2
    return 1
fi
export PYTHONPATH=$_vl_site:$_vl_root${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$_vl_root/.gpu/bin"
printf '#!/usr/bin/env python3\nimport sys\nfrom var_lab.cli import main\nsys.exit(main())\n' >"$_vl_root/.gpu/bin/var-lab"
chmod +x "$_vl_root/.gpu/bin/var-lab"
export PATH=$_vl_root/.gpu/bin:$PATH

python3 - "$_vl_site" <<'EOF' || return 1
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement

site = Path(sys.argv[1])
carried = list(md.distributions(path=[str(site)]))
problems = []
for dist in carried:
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{dist.metadata['Name']}: needs {req}, missing")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist.metadata['Name']}: needs {req}, has {have}")
print(f"gpu_bootstrap: {len(carried)} carried wheels in {site}; requirement conflicts: {len(problems)}")
for line in problems:
    print("  " + line)
import mlflow  # noqa: E402,F401  (fails here, loudly, if a module is still missing)
EOF

_vl_fid=$_vl_root/.gpu/fid
if [ -f "$_vl_fid/MANIFEST" ] && ! var-lab fid-weights --check >/dev/null 2>&1; then
    _vl_parts=$(sed -n 's/^parts //p' "$_vl_fid/MANIFEST")
    _vl_have=$(ls "$_vl_fid"/part.* 2>/dev/null | wc -l)
    if [ "$_vl_have" -ge "$_vl_parts" ]; then
        (cd "$_vl_fid" && sed -n 's/^part //p' MANIFEST | sha256sum -c --quiet -) || return 1
        cat "$_vl_fid"/part.* | gunzip >"$_vl_fid/weights.pth"
        (cd "$_vl_fid" && sed -n 's/^file //p' MANIFEST | sha256sum -c --quiet -) || return 1
        var-lab fid-weights --from-file "$_vl_fid/weights.pth" --force || return 1
        rm -f "$_vl_fid"/part.*
        echo "gpu_bootstrap: FID weights joined from $_vl_parts parts, sha256 checked, installed"
    else
        echo "gpu_bootstrap: FID weights: $_vl_have of $_vl_parts parts here (the rest come with the next calls)"
    fi
fi
