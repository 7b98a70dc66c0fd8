#!/usr/bin/env bash
# Issue 18's GPU figures in one lease: the step's profile, arjax beside nanoGPT (GPT-2 small, bf16,
# 16 x 1024), the same benchmark on the code before the issue (0e42d1e, in .oldtree/), the tries
# (attention=xla, XLA GPU flags, T=4096 with and without remat) and decode bf16 vs int8 at batch 1
# and 8 beside the memory-bandwidth roofline. One summary table at the end.
#
#   bash bench/gpu_session.sh                                     # on the lent GPU, from the repo root
#   DRY_RUN=1 PY=.venv/bin/python bash bench/gpu_session.sh       # tiny CPU settings: the plumbing only
#
# ONLY="arjax profile" runs just the parts named. Every part runs under `timeout` and a whole-session DEADLINE (seconds, default 500): a part that
# would start with less than its own budget left is skipped and says so, so the summary always prints.
# Needs .nanogpt/ (model.py, train.py, configurator.py from karpathy/nanoGPT) and, for the before
# figure, .oldtree/ (`git archive 0e42d1e model decode train bench tpu_configs | tar -x -C .oldtree`).
# If .whl/ holds wheels (flax pinned to the tested version), they are installed into a private
# folder first, ahead of the machine's own packages.
set -uo pipefail

NAME=gpu_session
# shellcheck source=bench/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"  # ROOT, OUT, PY, WORK, arjax on PYTHONPATH
DEADLINE=${DEADLINE:-500}
START=$SECONDS
BASEPATH=${PYTHONPATH#"$WORK/site"}  # what the caller had on PYTHONPATH, after gpu_env's arjax site
BASEPATH=${BASEPATH#:}
if compgen -G ".whl/*.whl" >/dev/null \
  && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/wheels" .whl/*.whl; then
  BASEPATH="$WORK/wheels${BASEPATH:+:$BASEPATH}"  # the pinned wheels ahead of the machine's own packages
fi
export PYTHONPATH="$WORK/site${BASEPATH:+:$BASEPATH}"

STEPS=30 BATCH=16 BLOCK=1024 LONG=4096 LONG_BATCH=4 TOKENS=256 DTYPE=bfloat16
TINY=() DEV=cuda COMPILE=True N_LAYER=12 NANO_DTYPE=bfloat16 QPRESET=gpt2-small
if [ -n "${DRY_RUN:-}" ]; then
  STEPS=6 BATCH=2 BLOCK=64 LONG=128 LONG_BATCH=2 TOKENS=8 DTYPE=float32 DEV=cpu COMPILE=False N_LAYER=2
  NANO_DTYPE=float32 QPRESET=tiny
  TINY=(--set model.n_layers=2 --set log_interval=2)
fi

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*"; }
left() { echo $((DEADLINE - (SECONDS - START))); }
part() {  # part NAME BUDGET CMD...: run CMD under timeout BUDGET if that much is left, log to $OUT/NAME.log
  local name=$1 budget=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0  # ONLY="arjax profile ...": run just these parts
  fi
  if [ "$(left)" -lt "$budget" ]; then
    log "$name: skipped, $(left)s left of the session, the part needs ${budget}s" | tee -a "$OUT/skipped.txt"
    return 0
  fi
  log "$name (timeout ${budget}s)"
  timeout -k 10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: exit status $rc"
  [ $rc -ne 0 ] && tail -n 15 "$OUT/$name.log"
  return 0
}

log "machine"
{
  timeout 30 nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 "$PY" - <<'EOF' 2>&1
import sys, time, jax, jax.numpy as jnp, flax, optax
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__, flax.__file__, "| optax", optax.__version__)
print("devices", jax.devices())
import arjax.model as m; print("arjax from", m.__file__)
if jax.default_backend() != "cpu":  # the two ceilings: device copy bandwidth and a bf16 matmul
    x = jnp.ones((1 << 31,), jnp.bfloat16)  # 4 GiB
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter(); f(x).block_until_ready(); ts.append(time.perf_counter() - t)
    print(f"copy_bw {2 * x.nbytes / min(ts) / 1e12:.2f} TB/s (read + write of 4 GiB, best of 5)")
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    g = jax.jit(lambda a: a @ a)
    g(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        r = g(a)
    r.block_until_ready()
    print(f"matmul {10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s (bf16 8192^3, mean of 10)")
EOF
} | tee "$OUT/machine.txt"

TRAIN=(bench/train.py --synthetic --config tpu_configs/gpt2-small-gpu.yaml --steps "$STEPS" --mesh data=1
  --set accum_steps=1 --set eval_iters=1 --set log_interval=5 "${TINY[@]}")
if [ -n "${DRY_RUN:-}" ]; then TRAIN+=(--set seq_len=$BLOCK); fi

# 1. where the time goes: the profile of the current step
part profile 110 "$PY" bench/profile_train.py --config tpu_configs/gpt2-small-gpu.yaml --batch-size "$BATCH" \
  --seq-len "$BLOCK" --accum-steps 1 --warmup 3 --steps 4 ${DRY_RUN:+--set n_layers=2} --json "$OUT/profile.json"

part profile_sharded 70 "$PY" bench/profile_train.py --config tpu_configs/gpt2-small-gpu.yaml --batch-size "$BATCH" \
  --seq-len "$BLOCK" --accum-steps 1 --warmup 3 --steps 4 ${DRY_RUN:+--set n_layers=2} --sharded \
  --json "$OUT/profile_sharded.json"

# 2. arjax now, and nanoGPT on the same batch
part arjax 100 "$PY" "${TRAIN[@]}" --set batch_size="$BATCH" --json "$OUT/arjax.json"

mkdir -p "$WORK/nanogpt/data/synthetic"
cp .nanogpt/train.py .nanogpt/model.py .nanogpt/configurator.py "$WORK/nanogpt/"  # configurator.py is read from the cwd
# Random GPT-2 token ids (< 50257) as uint16, nanoGPT's data format; no meta.pkl, so vocab 50304.
"$PY" -c "
import numpy as np
rng = np.random.default_rng(0)
rng.integers(0, 50257, size=4_000_000, dtype=np.uint16).tofile('$WORK/nanogpt/data/synthetic/train.bin')
rng.integers(0, 50257, size=200_000, dtype=np.uint16).tofile('$WORK/nanogpt/data/synthetic/val.bin')"
IN_DIR=(bash -c 'cd "$1" && shift && exec "$@"' _)  # IN_DIR DIR CMD...: run CMD in DIR (timeout takes no functions)
part nanogpt 150 "${IN_DIR[@]}" "$WORK/nanogpt" "$PY" train.py --dataset=synthetic --out_dir="$WORK/nanogpt/out" \
  --device="$DEV" --dtype="$NANO_DTYPE" --compile="$COMPILE" --batch_size="$BATCH" --block_size="$BLOCK" \
  --n_layer="$N_LAYER" --bias=True --dropout=0.0 --gradient_accumulation_steps=1 --max_iters="$STEPS" \
  --eval_interval=100000 --eval_iters=1 --log_interval=1 --always_save_checkpoint=False --wandb_log=False

# 3. the code before the issue (0e42d1e), same benchmark, its own arjax site
if [ -d .oldtree ]; then
  mkdir -p "$WORK/oldsite/arjax"
  for pkg in model decode train; do ln -sfn "$ROOT/.oldtree/$pkg" "$WORK/oldsite/arjax/$pkg"; done
  part old 100 env PYTHONPATH="$WORK/oldsite${BASEPATH:+:$BASEPATH}" "${IN_DIR[@]}" "$ROOT/.oldtree" "$PY" "${TRAIN[@]}" \
    --set batch_size="$BATCH" --json "$OUT/old.json"
fi

# 4. decode: bf16 vs int8 weights, batch 1 and 8, beside the roofline
part decode 120 "$PY" bench/quant.py --speed-only --preset "$QPRESET" --dtype "$DTYPE" --speed-tokens "$TOKENS" \
  --repeats 2 --batches 1 8 --variants fp "int8 weights" --json "$OUT/decode.json"

# 5. long context: T=4096 at batch 4, without and with remat of the matmul outputs only
LONGSET=(--set batch_size="$LONG_BATCH" --set seq_len="$LONG" --set model.max_len="$LONG")
part long 100 "$PY" "${TRAIN[@]}" "${LONGSET[@]}" --json "$OUT/long.json"
part long_dots 100 "$PY" "${TRAIN[@]}" "${LONGSET[@]}" --set model.remat=dots --json "$OUT/long_dots.json"

# 6. tries at T=1024: XLA's attention instead of cuDNN's; XLA GPU flags
part xla_attn 90 "$PY" "${TRAIN[@]}" --set batch_size="$BATCH" --set model.attention=xla --json "$OUT/xla_attn.json"
if [ -z "${DRY_RUN:-}" ]; then
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true" \
    part flags 90 "$PY" "${TRAIN[@]}" --set batch_size="$BATCH" --json "$OUT/flags.json"
fi

log "summary"
OUT=$OUT STEPS=$STEPS BATCH=$BATCH BLOCK=$BLOCK N_LAYER=$N_LAYER TOKENS=$TOKENS XLA_PYTHON_CLIENT_PREALLOCATE=false \
  timeout -k 5 90 "$PY" bench/gpu_summary.py 2>&1 | tee "$OUT/summary.txt"
log "done"
