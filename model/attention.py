"""The uncached attention (training, evaluation, scheduled sampling's passes): one function picks the
fused kernel the backend has, and falls back to XLA's with one log line when the kernel refuses.

    backend   implementation                                              when
    gpu       cuDNN flash attention (jax.nn.dot_product_attention,        bf16/fp16, the teacher-forced pass
              implementation="cudnn", is_causal=True)
    tpu       the Pallas flash attention kernel that ships with JAX        the teacher-forced pass
              (jax.experimental.pallas.ops.tpu.flash_attention, causal)
    cpu       XLA (jax.nn.dot_product_attention with the position mask)   always

The fused kernels are given the causal structure as a flag, never a dense [B, 1, T, T] mask (a
mask array takes cuDNN off its flash path and costs T^2 memory). They serve the *contiguous* pass,
where every row holds tokens at positions 0..T-1: training and evaluation windows. Padded prompts
(prefill) and cached decoding keep XLA's masked attention, which is exact for any positions.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")

log = logging.getLogger("arjax")
_REPORTED: set[str] = set()


def _fallback(reason: str) -> None:
    """One log line per distinct reason (a program traces attention once per layer)."""
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        log.warning("arjax: attention falls back to XLA: %s", reason)


def choose(implementation: str, backend: str, dtype) -> tuple[str, str | None]:
    """(the implementation to run, why not the fused one or None) for the contiguous causal pass."""
    if implementation == "xla":
        return "xla", None
    wanted = implementation if implementation != "auto" else {"gpu": "cudnn", "tpu": "pallas"}.get(backend, "xla")
    if wanted == "cudnn":
        if backend != "gpu":
            return "xla", f"cuDNN attention needs a GPU (backend {backend!r})"
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return "xla", f"cuDNN flash attention takes bfloat16 or float16, not {jnp.dtype(dtype).name}"
    if wanted == "pallas" and backend != "tpu":
        return "xla", f"the Pallas flash attention kernel is for TPUs (backend {backend!r})"
    return wanted, None


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, T, N, Dh], k/v [B, S, Hkv, Dh], mask [B, 1, T, S] -> [B, T, N, Dh]: the reference."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal flash attention with JAX's Pallas TPU kernel; q [B, T, N, Dh], k/v [B, T, Hkv, Dh]."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    groups = q.shape[2] // k.shape[2]  # grouped-query heads: the kernel wants one K/V head per query head
    k, v = (jnp.repeat(x, groups, axis=2) if groups > 1 else x for x in (k, v))
    out = flash_attention(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), causal=True, sm_scale=1.0 / math.sqrt(q.shape[-1])
    )  # [B, N, T, Dh]
    return out.swapaxes(1, 2)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    implementation: str = "auto",
    backend: str | None = None,
) -> jax.Array:
    """The contiguous pass's attention (rows at positions 0..T-1; ``mask`` is its causal mask, used
    by the XLA path only): the fused kernel ``choose`` picks, else XLA's, with one log line."""
    impl, reason = choose(implementation, backend or jax.default_backend(), q.dtype)
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        except Exception as e:  # noqa: BLE001 (the kernel's own refusal: a head size, a cuDNN version ...)
            reason = f"cuDNN refused q {q.shape} {q.dtype} ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    elif impl == "pallas":
        try:
            return pallas_tpu_attention(q, k, v)
        except Exception as e:  # noqa: BLE001 (block sizes that do not divide T, an unsupported head size ...)
            reason = (
                f"the Pallas kernel refused q {q.shape} {q.dtype} "
                f"({type(e).__name__}: {' '.join(str(e).split())[:160]})"
            )
    if reason is not None:
        _fallback(reason)
    return xla_attention(q, k, v, mask)


__all__ = ["IMPLEMENTATIONS", "causal_attention", "choose", "pallas_tpu_attention", "xla_attention"]
