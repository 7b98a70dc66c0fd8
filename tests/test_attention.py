"""The teacher-forced pass's attention (arjax.model.attention): which kernel each backend gets, the
fallback, and the Pallas TPU kernel (in interpret mode, on CPU) against XLA's attention.

cuDNN's kernel needs a GPU and cannot run here: its selection and fallback are tested, its numbers
are checked by bench/gpu_profile.sh on a GPU.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.model import attention, get_config
from arjax.model.transformer import attention_mask


@pytest.mark.parametrize(
    "implementation, backend, dtype, want, refused",
    [
        ("auto", "cpu", "float32", "xla", False),
        ("auto", "cpu", "bfloat16", "xla", False),
        ("auto", "gpu", "bfloat16", "cudnn", False),
        ("auto", "gpu", "float16", "cudnn", False),
        ("auto", "gpu", "float32", "xla", True),  # cuDNN's flash kernel takes 16-bit floats only
        ("auto", "tpu", "float32", "pallas", False),
        ("cudnn", "cpu", "bfloat16", "xla", True),
        ("pallas", "gpu", "bfloat16", "xla", True),
        ("xla", "gpu", "bfloat16", "xla", False),
    ],
)
def test_each_backend_gets_its_kernel(implementation, backend, dtype, want, refused):
    impl, reason = attention.choose(implementation, backend, jnp.dtype(dtype))
    assert impl == want and (reason is not None) == refused


def _qkv(B=2, T=256, N=4, K=2, D=64, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, D), dtype)
    k, v = (jax.random.normal(key, (B, T, K, D), dtype) for key in keys[1:])
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return q, k, v, attention_mask(pos, pos)


def test_a_kernel_that_cannot_run_falls_back_with_one_log_line(caplog):
    q, k, v, mask = _qkv(T=16)
    attention._REPORTED.clear()
    with caplog.at_level(logging.WARNING, logger="arjax"):
        for _ in range(3):  # one line, however many layers trace it
            out = attention.causal_attention(q, k, v, mask, implementation="cudnn")
    assert [r.getMessage() for r in caplog.records] == [
        "arjax: attention falls back to XLA: cuDNN attention needs a GPU (backend 'cpu')"
    ]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(attention.xla_attention(q, k, v, mask)))


@pytest.mark.slow
def test_the_pallas_tpu_kernel_in_interpret_mode_equals_xla_forward_and_backward():
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, mask = _qkv()  # 4 query heads over 2 KV heads

    def loss(fn, q, k, v):
        return (fn(q, k, v) * jnp.cos(jnp.arange(64.0))).sum()

    xla = lambda q, k, v: attention.xla_attention(q, k, v, mask)
    want, want_grads = jax.value_and_grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    with pltpu.force_tpu_interpret_mode():
        got, got_grads = jax.value_and_grad(lambda *a: loss(attention.pallas_tpu_attention, *a), argnums=(0, 1, 2))(
            q, k, v
        )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_a_checkpointed_model_config_without_the_attention_key_still_loads_and_resumes():
    from arjax.train.checkpoint import config_mismatch

    saved = get_config("tiny").to_dict()
    del saved["attention"]  # written before the key existed
    assert config_mismatch(saved, get_config("tiny", attention="cudnn")) == {}
    assert "n_layers" in config_mismatch(saved, get_config("tiny", n_layers=3))
