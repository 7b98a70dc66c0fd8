# Sourced by bench/gpu_*.sh: the setup every lent-GPU script shares. Needs NAME (the work dir's prefix).
# From the repo root: $ROOT, $OUT (default /tmp/out), $PY (python3), a work dir $WORK removed on exit,
# and arjax importable from this checkout through a folder of symlinks on PYTHONPATH (arjax.model ->
# model/, ...): nothing is installed, so pyproject's version pins do not apply and no network is needed.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}  # default 0.75; cuBLAS/cuDNN need little
WORK=$(mktemp -d "/tmp/${NAME}.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/site/arjax"  # arjax is a namespace package: only its subpackages exist as folders
for pkg in model decode train; do ln -s "$ROOT/$pkg" "$WORK/site/arjax/$pkg"; done
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
