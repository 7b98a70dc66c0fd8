"""Params, batch and decoding shard with NamedSharding: no single-device assumption anywhere.

Runs in a subprocess with 4 fake CPU devices (the device count is fixed when JAX starts).
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from arjax.model import Transformer, get_config
    from arjax.decode import generate

    assert jax.device_count() == 4, jax.devices()
    cfg = get_config("tiny", pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, use_bias=False)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, cfg.vocab_size)
    ref_logits, _ = model(tokens)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    ref = generate(model, prompts, max_new_tokens=8)

    # 2-way data parallel x 2-way tensor parallel: shard every kernel's output (or input) axis.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    def spec(path, x):
        name = "/".join(str(p) for p in path)
        if x.ndim == 2 and ("attn/o" in name or "mlp/down" in name):
            return NamedSharding(mesh, P("model", None))
        if x.ndim == 2:
            return NamedSharding(mesh, P(None, "model"))
        return NamedSharding(mesh, P())
    graphdef, state = nnx.split(model)
    state = jax.tree.map_with_path(lambda p, x: jax.device_put(x, spec(p, x)), state)
    sharded = nnx.merge(graphdef, state)
    assert len(sharded.blocks[0].attn.q.kernel[...].sharding.device_set) == 4

    batch = jax.device_put(tokens, NamedSharding(mesh, P("data", None)))
    logits, _ = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    out = generate(sharded, prompts, max_new_tokens=8)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    print("SHARDED-OK")
    """
)


def test_sharded_forward_and_generate_match_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHARDED-OK" in proc.stdout
