#!/usr/bin/env bash
# GPU training throughput: arjax (bench/train.py --synthetic, GPT-2 small, bf16) beside nanoGPT's own
# train.py on the same GPU, same model, same batch; tokens/s, MFU against the GPU's spec-sheet peak, ratio.
#
#   bash bench/gpu_train.sh                 # from the repo root; about 5-8 minutes, no network needed
#   DRY_RUN=1 PY=.venv/bin/python bash bench/gpu_train.sh   # tiny CPU settings: checks the plumbing only
#
# Needs python3 with jax (CUDA), flax, optax, orbax-checkpoint, rich, pyyaml, numpy, and torch (CUDA)
# for nanoGPT; and .nanogpt/ in the repo root: model.py, train.py, configurator.py from karpathy/nanoGPT
# (commit in .nanogpt/COMMIT). arjax is imported from this checkout through a temporary directory of
# symlinks on PYTHONPATH (arjax.model -> model/, ...): nothing is installed, so pyproject's version pins
# (jax<0.11) do not get in the way, and no network is needed.
#
# Logs, summary.txt and summary.json go to $OUT (default /tmp/out). Each part runs under `timeout`,
# so one hang cannot eat the budget. Knobs (environment): STEPS (40), BATCH (16), SKIP (10: nanoGPT
# iterations left out of the average, as arjax leaves out its first 10 logged steps), ARJAX_TIMEOUT (180),
# NANOGPT_TIMEOUT (210, torch.compile included), EAGER_TIMEOUT (90: nanoGPT without compile, only if the
# compiled run fails), PY (python3), XLA_FLAGS (passed through; none are set here).
set -uo pipefail

NAME=gpu_train
# shellcheck source=bench/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"  # ROOT, OUT, PY, WORK, arjax on PYTHONPATH
STEPS=${STEPS:-40}
BATCH=${BATCH:-16}
SKIP=${SKIP:-10}
ARJAX_TIMEOUT=${ARJAX_TIMEOUT:-180}
NANOGPT_TIMEOUT=${NANOGPT_TIMEOUT:-210}
EAGER_TIMEOUT=${EAGER_TIMEOUT:-90}

# Model and batch, the same on both sides: GPT-2 small (12 x 768, biases, vocab 50304), context 1024.
N_LAYER=12 BLOCK=1024 DTYPE_NANO=bfloat16 DEVICE=cuda COMPILE=True
ARJAX_TINY=()
if [ -n "${DRY_RUN:-}" ]; then  # plumbing check on a CPU: 2 layers, context 64, a few steps
  N_LAYER=2 BLOCK=64 DTYPE_NANO=float32 DEVICE=cpu COMPILE=False
  STEPS=${STEPS_DRY:-6} BATCH=2 SKIP=2
  ARJAX_TINY=(--set model.n_layers=2 --set seq_len=64 --set log_interval=2)
fi

log() { echo "[$(date -u +%H:%M:%S)] $*"; }

log "machine"
{
  timeout 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || echo "no nvidia-smi"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 90 "$PY" -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__, '| optax', optax.__version__); print('jax devices:', jax.devices())" 2>&1
  timeout 90 "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1
  timeout 60 "$PY" -c "import arjax.train.perf as p; print('arjax from', p.__file__)" 2>&1
} | tee "$OUT/machine.txt"

# --- arjax ----------------------------------------------------------------------------------------
run_arjax() {  # $1: batch size, $2: log file, $3: timeout
  timeout -k 10 "$3" "$PY" bench/train.py --synthetic --config tpu_configs/gpt2-small-gpu.yaml \
    --steps "$STEPS" --mesh data=1 --set accum_steps=1 --set batch_size="$1" --set eval_iters=1 \
    "${ARJAX_TINY[@]}" --json "$OUT/arjax.json" >"$2" 2>&1
}
log "arjax: bench/train.py --synthetic, gpt2-small bf16, $BATCH x $BLOCK tokens per step, $STEPS steps (timeout ${ARJAX_TIMEOUT}s)"
rm -f "$OUT/arjax.json"
start=$SECONDS
run_arjax "$BATCH" "$OUT/arjax.log" "$ARJAX_TIMEOUT"
rc=$?
left=$((ARJAX_TIMEOUT - (SECONDS - start)))  # a retry gets what the first run left of the arjax budget
if [ $rc -ne 0 ] && [ $left -ge 60 ] && grep -qiE "RESOURCE_EXHAUSTED|out of memory" "$OUT/arjax.log"; then
  log "arjax: out of memory at batch $BATCH; once more at batch $((BATCH / 2)) (timeout ${left}s)"
  run_arjax "$((BATCH / 2))" "$OUT/arjax-half.log" "$left"
  rc=$?
fi
log "arjax: exit status $rc"
grep -E "^(config|throughput|per device|model FLOPs|device memory|MFU)" "$OUT"/arjax*.log
[ $rc -ne 0 ] && tail -n 25 "$OUT"/arjax*.log

# --- nanoGPT --------------------------------------------------------------------------------------
run_nanogpt() {  # $1: compile True/False, $2: timeout, $3: log file
  (cd "$WORK/nanogpt" && timeout -k 10 "$2" "$PY" train.py --dataset=synthetic --out_dir="$WORK/nanogpt/out" \
    --device="$DEVICE" --dtype="$DTYPE_NANO" --compile="$1" --batch_size="$BATCH" --block_size="$BLOCK" \
    --n_layer="$N_LAYER" --bias=True --dropout=0.0 --gradient_accumulation_steps=1 --max_iters="$STEPS" \
    --eval_interval=100000 --eval_iters=1 --log_interval=1 --always_save_checkpoint=False --wandb_log=False) >"$3" 2>&1
}
if [ -f .nanogpt/train.py ] && [ -f .nanogpt/model.py ] && [ -f .nanogpt/configurator.py ]; then
  mkdir -p "$WORK/nanogpt/data/synthetic"
  cp .nanogpt/train.py .nanogpt/model.py .nanogpt/configurator.py "$WORK/nanogpt/"  # configurator.py is read from the cwd
  # Random GPT-2 token ids (< 50257) as uint16, nanoGPT's data format; no meta.pkl, so vocab 50304.
  "$PY" -c "
import numpy as np
rng = np.random.default_rng(0)
rng.integers(0, 50257, size=4_000_000, dtype=np.uint16).tofile('$WORK/nanogpt/data/synthetic/train.bin')
rng.integers(0, 50257, size=200_000, dtype=np.uint16).tofile('$WORK/nanogpt/data/synthetic/val.bin')"
  log "nanoGPT: train.py compile=$COMPILE, $BATCH x $BLOCK tokens per iteration, $STEPS iterations (timeout ${NANOGPT_TIMEOUT}s)"
  run_nanogpt "$COMPILE" "$NANOGPT_TIMEOUT" "$OUT/nanogpt.log"
  rc=$?
  log "nanoGPT: exit status $rc"
  if ! grep -q "^iter $STEPS:" "$OUT/nanogpt.log"; then
    tail -n 25 "$OUT/nanogpt.log"
    if [ "$COMPILE" = True ]; then
      log "nanoGPT: the compiled run did not finish; once more without torch.compile (timeout ${EAGER_TIMEOUT}s)"
      run_nanogpt False "$EAGER_TIMEOUT" "$OUT/nanogpt-eager.log"
      log "nanoGPT (eager): exit status $?"
    fi
  fi
else
  log "nanoGPT: .nanogpt/{train,model,configurator}.py missing in $ROOT; carry .nanogpt to this machine"
fi

# --- summary --------------------------------------------------------------------------------------
# (jax only names the device here: no preallocation of GPU memory)
SKIP=$SKIP BATCH=$BATCH BLOCK=$BLOCK N_LAYER=$N_LAYER COMPILE=$COMPILE OUT=$OUT XLA_PYTHON_CLIENT_PREALLOCATE=false \
  timeout -k 5 120 "$PY" - <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, os, re, statistics

from arjax.model import get_config
from arjax.train.perf import device_peak_flops, flops_per_token, mfu

out, skip = os.environ["OUT"], int(os.environ["SKIP"])
B, T, L = int(os.environ["BATCH"]), int(os.environ["BLOCK"]), int(os.environ["N_LAYER"])
summary = {}

try:
    arjax = json.load(open(os.path.join(out, "arjax.json")))[0]
except (OSError, ValueError, IndexError):
    arjax = None

def gpu_device():
    try:
        import jax
        return jax.devices()[0]
    except Exception:  # jax broken on this machine: name the GPU through torch
        import torch
        class Dev:
            platform, device_kind = "gpu", torch.cuda.get_device_name(0)
        return Dev()

dev = gpu_device()
peak = device_peak_flops(dev, "bfloat16" if dev.platform != "cpu" else "float32")
fpt = flops_per_token(get_config("gpt2-small", vocab_size=50304, n_layers=L), T)
print(f"device   {dev.device_kind} ({dev.platform}); peak " + (f"{peak[0] / 1e12:.1f} TFLOP/s, {peak[1]}" if peak else "unknown"))
print(f"model    GPT-2 small, {L} layers, vocab 50304, biases; {B} x {T} tokens per step; {fpt / 1e9:.3f} GFLOP/token (6N + 12LdT)")

if arjax:
    m = arjax["mfu"]
    print(f"arjax    {arjax['tokens_per_s_per_device']:>10,.0f} tokens/s   MFU " + (f"{m:.1%}" if m is not None else "n/a")
          + f"   (batch {arjax['batch_size']}, {arjax['steps']} steps, first logged interval left out; {arjax['dtype']})")
    summary["arjax"] = {k: arjax[k] for k in ("tokens_per_s_per_device", "mfu", "batch_size", "steps", "peak_bytes_in_use")}
else:
    print("arjax    no result (see arjax.log)")

nano = None
for name in ("nanogpt.log", "nanogpt-eager.log"):
    try:
        text = open(os.path.join(out, name)).read()
    except OSError:
        continue
    ms = {int(i): float(t) for i, t in re.findall(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", text, re.M)}
    kept = [t for i, t in sorted(ms.items()) if i >= skip]
    if kept:
        nano = {"log": name, "iters": len(kept), "mean_ms": statistics.mean(kept), "median_ms": statistics.median(kept),
                "tokens_per_s": B * T / (statistics.mean(kept) / 1e3)}
        nano["mfu"] = mfu(nano["tokens_per_s"], fpt, peak[0]) if peak else None
        compiled = "eager, the compiled run failed" if name != "nanogpt.log" else (
            "torch.compile" if os.environ["COMPILE"] == "True" else "eager")
        break
if nano:
    print(f"nanoGPT  {nano['tokens_per_s']:>10,.0f} tokens/s   MFU " + (f"{nano['mfu']:.1%}" if nano["mfu"] is not None else "n/a")
          + f"   (batch {B}, mean of {nano['iters']} iterations from iter {skip}: {nano['mean_ms']:.1f} ms, median "
          + f"{nano['median_ms']:.1f} ms; {compiled})")
    summary["nanogpt"] = nano
else:
    print("nanoGPT  no result (see nanogpt*.log)")
if arjax and nano and arjax["batch_size"] == B:
    ratio = arjax["tokens_per_s_per_device"] / nano["tokens_per_s"]
    print(f"ratio    arjax / nanoGPT = {ratio:.2f}x tokens/s")
    summary["ratio"] = ratio
elif arjax and nano:
    print(f"ratio    n/a: arjax ran at batch {arjax['batch_size']}, nanoGPT at {B}")
summary.update(device=dev.device_kind, peak_flops=peak[0] if peak else None, flops_per_token=fpt)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
log "done; logs in $OUT"
