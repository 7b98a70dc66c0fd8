"""Training efficiency: model FLOPs per token, the peak FLOP/s of a device, MFU, and a device's memory.

MFU (model FLOPs utilisation, PaLM appendix B) is the FLOP/s the model's arithmetic needs at the
measured throughput, divided by the device's peak: per device, so one number compares one chip,
eight chips and a pod. ``bench/train.py`` reports it; the figures here are the one place for it.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from arjax.model.memory import device_memory_bytes  # noqa: F401 (here for the trainer and its tests)
from arjax.model.transformer import count_params


def flops_per_token(model_cfg, seq_len: int) -> float:
    """nanoGPT's estimate (PaLM appendix B) of one training token: 6 N for the weights, 12 L d T for attention.

    6 N: a multiply-add (2 FLOPs) per parameter forward, twice that backward. N excludes the
    learned position table (a lookup, no FLOPs); the tied embedding counts once, as the output
    head's matmul. 12 L d T: the scores q k^T and the mixing p v, each 2 d T per token per layer
    forward, times 3 for forward + backward. Scheduled sampling's extra passes are not counted:
    this is the teacher-forced model's arithmetic.
    """
    n = count_params(model_cfg)
    if model_cfg.pos == "learned":
        n -= model_cfg.max_len * model_cfg.d_model
    return float(6 * n + 12 * model_cfg.n_layers * model_cfg.d_model * seq_len)


# Peak dense (no 2:4 sparsity) FLOP/s of one JAX device, from the vendors' spec sheets (Google Cloud
# TPU system-architecture pages; NVIDIA A100, H100 and H200 datasheets). Keys are matched against
# ``device.device_kind`` lower-cased, first match wins, so the more specific names come first.
#
# Per compute dtype:
# - "bfloat16" (float16 is the same rate on all of these): the matrix units' bf16 rate.
# - "float32": what a float32 matmul runs at under JAX's default precision. On TPU that is one
#   bf16 pass of the MXU, so the bf16 rate. On A100/H100/H200 XLA lets cuBLAS use TF32 tensor
#   cores for float32 dots by default, so the dense TF32 rate (not the much lower CUDA-core fp32
#   rate: 19.5 / 67 / 51 TFLOP/s on A100 / H100 SXM / H100 PCIe). With
#   ``jax_default_matmul_precision="highest"`` the real ceiling is lower and MFU reads high.
#
# TPU v2 and v3 expose each chip's two TensorCores as two JAX devices, so their figures are half a
# chip; v4 and v5p join both cores into one device (megacore); v5e and v6e have one core per chip.
_PEAKS: tuple[tuple[tuple[str, ...], str, float | None, float | None], ...] = (
    # (substrings that must all occur, name, bf16 FLOP/s, float32 FLOP/s)
    (("tpu v2",), "TPU v2 core (45 TFLOP/s per chip / 2)", 22.5e12, 22.5e12),
    (("tpu v3",), "TPU v3 core (123 TFLOP/s per chip / 2)", 61.5e12, 61.5e12),
    (("tpu v4 lite",), "TPU v4i", None, None),  # inference chip; no figure we trust: no MFU
    (("tpu v4",), "TPU v4", 275e12, 275e12),
    (("tpu v5 lite",), "TPU v5e", 197e12, 197e12),
    (("tpu v5e",), "TPU v5e", 197e12, 197e12),
    (("tpu v5",), "TPU v5p", 459e12, 459e12),  # "TPU v5" and "TPU v5p"
    (("tpu v6 lite",), "TPU v6e", 918e12, 918e12),
    (("tpu v6e",), "TPU v6e", 918e12, 918e12),
    (("h100", "pcie"), "H100 PCIe", 756e12, 378e12),
    (("h100", "nvl"), "H100 NVL", 835e12, 418e12),
    (("h100",), "H100 SXM", 989e12, 495e12),
    (("h200", "nvl"), "H200 NVL", 835e12, 418e12),
    (("h200",), "H200 SXM", 989e12, 495e12),  # also GH200
    (("a100",), "A100", 312e12, 156e12),  # SXM and PCIe, 40 and 80 GB alike
)


def device_peak_flops(device, dtype="bfloat16") -> tuple[float, str] | None:
    """Peak FLOP/s of ``device`` for matmuls in the compute ``dtype``, and where the figure comes from.

    Accelerators: the spec-sheet table above. CPU: a jitted matmul in ``dtype`` measured once per
    process (about a second at most), "measured". An accelerator not in the table: None (the
    caller then leaves MFU out rather than guess).
    """
    name = jnp.dtype(dtype).name
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={name!r}: peaks are known for bfloat16, float16 and float32 compute")
    if device.platform == "cpu":
        flops = _cached_cpu_peak(name)
        return flops, f"measured: best {name} 2048^2 jitted matmul on this CPU"
    kind = device.device_kind.lower()
    for needles, label, bf16, fp32 in _PEAKS:
        if all(s in kind for s in needles):
            flops = fp32 if name == "float32" else bf16
            if flops is None:
                return None
            what = "dense bf16"
            if name == "float32":
                what = "dense TF32" if device.platform == "gpu" else "dense bf16 (float32 matmuls run as one bf16 pass)"
            return flops, f"spec sheet: {label}, {what} {flops / 1e12:.1f} TFLOP/s"
    return None


def matmul_peak_flops(n: int = 2048, dtype="float32", *, reps: int = 10, budget_s: float = 0.5) -> float:
    """Best FLOP/s of one jitted [n, n] @ [n, n] matmul over up to ``reps`` runs: a machine's practical peak.

    Stops early after ``budget_s`` seconds (at least 3 runs), so a slow host pays about a second.
    Measured anew on every call; ``device_peak_flops`` caches one measurement per process.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()  # compile
    best, spent = float("inf"), 0.0
    for i in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if i >= 2 and spent > budget_s:
            break
    return 2 * n**3 / best


@functools.cache
def _cached_cpu_peak(dtype: str) -> float:
    return matmul_peak_flops(2048, dtype)


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the model needs at this throughput, as a fraction of one device's peak."""
    if peak <= 0:
        raise ValueError(f"peak={peak} FLOP/s must be positive")
    return tokens_per_s_per_device * flops_per_token / peak
