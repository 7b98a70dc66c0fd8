#!/usr/bin/env bash
# GPU decode speed, bf16 vs int8 weights vs int8 weights + int8 KV cache, batch 1 and 8, in one run
# (bench/quant.py --speed-only, random weights stored in bf16). Two models: GPT-2 small (124M, tied
# head) and a ~1B Llama-style model (llama-small widened), where a decode step is bound by reading the
# weights. "int8 weights, hoisted" is XLA's default without our optimization barrier: the int8 -> bf16
# conversion moved out of the decode loop (bf16 copies of the weights made once per call).
#
#   bash bench/gpu_quant.sh                  # from the repo root; about 5-7 minutes, no network needed
#   DRY_RUN=1 PY=.venv/bin/python bash bench/gpu_quant.sh   # tiny CPU settings: checks the plumbing only
#
# Needs python3 with jax (CUDA), flax, numpy. arjax is imported from this checkout through a temporary
# directory of symlinks on PYTHONPATH (arjax.model -> model/, ...): nothing is installed, no network.
# Output: $OUT (default /tmp/out)/quant-*.log and quant-*.json, and summary.txt. Knobs (environment):
# TOKENS (256 new tokens per row), REPEATS (2), PART_TIMEOUT (180 s per model), PY (python3).
set -uo pipefail

NAME=gpu_quant
# shellcheck source=bench/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"  # ROOT, OUT, PY, WORK, arjax on PYTHONPATH
TOKENS=${TOKENS:-256}
REPEATS=${REPEATS:-2}
PART_TIMEOUT=${PART_TIMEOUT:-180}
DTYPE=bfloat16

# name | preset | overrides (KEY=INT, space separated)
MODELS=("gpt2-small|gpt2-small|" "llama-1b|llama-small|d_model=2048 n_layers=16 n_heads=16 n_kv_heads=4")
if [ -n "${DRY_RUN:-}" ]; then  # plumbing check on a CPU: tiny models, a few tokens
  MODELS=("tiny|tiny|" "tiny-llama|llama-small|d_model=64 n_layers=2 n_heads=4 n_kv_heads=2")
  TOKENS=16 REPEATS=1 DTYPE=float32
fi

log() { echo "[$(date -u +%H:%M:%S)] $*"; }

log "machine"
{
  timeout 30 nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 90 "$PY" -c "import jax, flax; print('jax', jax.__version__, '| flax', flax.__version__, '|', jax.devices())" 2>&1
  timeout 60 "$PY" -c "import arjax.model.quant as q; print('arjax from', q.__file__)" 2>&1
} | tee "$OUT/machine.txt"

for entry in "${MODELS[@]}"; do
  IFS='|' read -r name preset overrides <<<"$entry"
  sets=()
  for kv in $overrides; do sets+=(--set "$kv"); done
  log "$name: bench/quant.py --speed-only --preset $preset ${overrides} --dtype $DTYPE, batch 1 and 8, $TOKENS tokens (timeout ${PART_TIMEOUT}s)"
  timeout -k 10 "$PART_TIMEOUT" "$PY" bench/quant.py --speed-only --preset "$preset" "${sets[@]}" --dtype "$DTYPE" \
    --speed-tokens "$TOKENS" --repeats "$REPEATS" --batches 1 8 \
    --variants fp "int8 weights" "int8 weights + KV" "int8 weights, hoisted" \
    --json "$OUT/quant-$name.json" 2>&1 | tee "$OUT/quant-$name.log"
  log "$name: exit status ${PIPESTATUS[0]}"
done

log "summary"
OUT=$OUT "$PY" - <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import glob, json, os

for path in sorted(glob.glob(os.path.join(os.environ["OUT"], "quant-*.json"))):
    r = json.load(open(path))
    name = os.path.basename(path)[6:-5]
    speed = {(x["variant"], x["batch"]): x["tokens_per_s"] for x in r.get("speed", [])}
    b = r.get("bytes", {})
    print(f"{name} on {r['device']}: weights {b.get('weights_fp', 0) / 1e6:.0f} MB -> {b.get('weights_int8', 0) / 1e6:.0f} MB")
    for batch in (1, 8):
        base = speed.get(("fp", batch))
        if not base:
            continue
        row = "  ".join(f"{v} {speed[(v, batch)]:,.0f} ({speed[(v, batch)] / base:.2f}x)" for v in
                        ("int8 weights", "int8 weights + KV", "int8 weights, hoisted") if (v, batch) in speed)
        print(f"  batch {batch}: {r.get('dtype', 'fp')} {base:,.0f} tokens/s  {row}")
EOF
log "done; logs in $OUT"
