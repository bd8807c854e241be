#!/usr/bin/env bash
# Download, on a machine with internet, exactly the wheels that the lent GPU image lacks for var-lab, into .whl/.
#
# The GPU image (CPython 3.12, x86_64; its package list is in /work/.library/device/KINDS.md and, as read on the
# machine, in benchmarks/gpu_image_packages.txt) already holds torch, lightning, torchmetrics, numpy, pandas, scipy,
# matplotlib, protobuf, pyyaml, requests, click, anyio, packaging, typing-extensions, ... Those are never carried: a
# second copy on PYTHONPATH would shadow the image's. What it lacks is var-lab's tracking, CLI and FID stack:
#   - mlflow-skinny (the whole `mlflow` Python package, sqlite store included, without the server wheels: Flask,
#     gunicorn, graphene, docker, huey, skops, ... are never imported by var-lab's sqlite tracking), and the modules
#     `import mlflow` plus the sqlite store really import: SQLAlchemy, alembic + Mako (schema migrations),
#     cryptography + cffi (the model-registry tables import Fernet), fastapi + starlette (mlflow.gateway.utils),
#     pydantic (+ core, annotated-types, typing-inspection), opentelemetry (tracing), databricks-sdk (a
#     find_spec("databricks.agents") at import), GitPython (+ gitdb, smmap), cachetools, sqlparse, importlib_metadata;
#   - jsonargparse[signatures] (docstring_parser, typeshed_client), submitit, torch-fidelity.
# The set was found by running `var-lab fit` (sqlite MLflow), `var-lab eval`, `var-lab analyze` and `var-lab sweep
# expand` with only the image's distributions plus these on the path (python -S, symlinked site; see
# benchmarks/GPU.md); every one of them is imported by those commands.
#
# Versions are the ones var-lab's CPU venv resolved and tested; every wheel is pure Python or manylinux x86_64 for
# CPython 3.12. `benchmarks/gpu_bootstrap.sh` installs them there and checks each Requires-Dist against the machine.
#
# Usage: bash benchmarks/gpu_wheels.sh [DEST]     (DEST defaults to .whl at the repository root; about 20 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
mkdir -p "$dest"

PINS=(
  mlflow-skinny==3.17.2
  SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3
  cryptography==50.0.2 cffi==2.1.1
  fastapi==0.165.0 starlette==1.10.0
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  databricks-sdk==0.167.0
  GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3
  cachetools==7.3.3 sqlparse==0.6.1 importlib_metadata==9.1.0
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
  submitit==1.5.4
  torch_fidelity==0.4.0
)

platforms=()
for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${platforms[@]}" --platform any -d "$dest" "${PINS[@]}"

# Keep one version of each distribution (two stop the whole install): drop wheels left from other pins.
python3 - "$dest" "${PINS[@]}" <<'EOF'
import re, sys
from pathlib import Path
dest, pins = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
want = {norm(p.split("==")[0]): p.split("==")[1] for p in pins}
total = 0
for whl in sorted(dest.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    if want.get(norm(name)) != version:
        print(f"removing {whl.name} (not pinned)")
        whl.unlink()
        continue
    total += whl.stat().st_size
missing = set(want) - {norm(w.name.split("-")[0]) for w in dest.glob("*.whl")}
if missing:
    sys.exit(f"missing wheels: {sorted(missing)}")
print(f"{len(want)} wheels, {total / 2**20:.1f} MiB in {dest}/")
EOF
