"""Memory estimates (arjax.model.memory): exact where they count arrays, a lower bound elsewhere, and a
one-line refusal naming the setting and the limit before anything is allocated."""

import itertools
import subprocess
import sys

import pytest
from flax import nnx

from arjax.decode import generate
from arjax.decode.engine import Engine
from arjax.model import PRESETS, Transformer, count_params, get_config, init_cache, memory
from arjax.model.memory import Need, check_needs


def test_the_parameter_count_by_arithmetic_equals_the_model_built_abstractly():
    for name in sorted(PRESETS):
        assert memory.param_count(get_config(name)) == count_params(get_config(name)), name
    variants = itertools.product(
        [True, False], [True, False], ["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"]
    )
    for use_bias, tie, pos, norm, mlp in variants:  # every family switch, on a small model
        cfg = get_config("tiny", use_bias=use_bias, tie_embeddings=tie, pos=pos, norm=norm, mlp=mlp)
        assert memory.param_count(cfg) == count_params(cfg), (use_bias, tie, pos, norm, mlp)
    gqa = get_config("tiny", n_heads=4, n_kv_heads=2, head_dim=24, d_ff=100)
    assert memory.param_count(gqa) == count_params(gqa)


def test_a_config_of_two_billion_layers_is_counted_at_once():
    cfg = get_config("tiny", n_layers=2**31 - 1)
    assert memory.param_count(cfg) > 2**31 * 10_000  # arithmetic: no module is built, not even abstractly


@pytest.mark.parametrize("dtype", [None, "bfloat16", "int8"])
def test_the_kv_cache_estimate_is_the_cache_that_is_allocated(dtype):
    cfg = get_config("tiny", n_heads=4, n_kv_heads=2)
    cache = init_cache(cfg, 3, 40, dtype)
    arrays = [*cache.k, *cache.v, *(cache.k_scale or ()), *(cache.v_scale or ())]
    assert memory.kv_cache_bytes(cfg, 3, 40, dtype) == sum(x.nbytes for x in arrays)


def test_a_loaded_model_counts_its_real_bytes():
    model = Transformer(get_config("tiny"), rngs=nnx.Rngs(0))
    [need] = memory.loaded_needs(nnx.state(model))
    assert need.nbytes == 4 * count_params(get_config("tiny"))


def test_the_biggest_need_is_named_with_the_limit(monkeypatch):
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 10 * 2**30)
    check_needs([Need("a", 6 * 2**30, "fix a"), Need("b", 3 * 2**30, "fix b", per_device=False)])  # 9 GiB: fits
    with pytest.raises(ValueError) as e:
        check_needs([Need("a (x=3)", 6 * 2**30, "lower x"), Need("b", 5 * 2**30, "fix b", per_device=False)])
    assert str(e.value) == "a (x=3): at least 6.0 GiB (11.0 GiB in all), but this host has 10.0 GiB; lower x"


class FakeGPU:
    platform, process_index = "gpu", 0

    def memory_stats(self):
        return {"bytes_limit": 8 * 2**30}


def test_on_an_accelerator_device_and_host_memory_are_separate_budgets(monkeypatch):
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 10 * 2**30)
    gpu = [FakeGPU()]
    check_needs([Need("weights", 7 * 2**30, "f"), Need("windows", 9 * 2**30, "g", per_device=False)], gpu)
    with pytest.raises(ValueError, match=r"^weights: at least 9.0 GiB, but a GPU device has 8.0 GiB; f$"):
        check_needs([Need("weights", 9 * 2**30, "f")], gpu)
    with pytest.raises(ValueError, match="windows: at least 11.0 GiB, but this host has 10.0 GiB; g"):
        check_needs([Need("weights", 1, "f"), Need("windows", 11 * 2**30, "g", per_device=False)], gpu)


def test_the_host_limit_follows_ulimit_v():
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.RLIM_INFINITY)); "
        "from arjax.model.memory import host_memory_bytes; print(host_memory_bytes())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert int(out) == 3 * 2**30


def test_engines_and_generate_refuse_caches_that_cannot_fit_before_allocating(monkeypatch):
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 64 * 2**20)  # a 64 MiB machine
    model = Transformer(get_config("tiny", pos="rope", n_heads=2, max_len=64), rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"the KV cache of slots=4096 x max_len=64: at least .* but this host has "
        r"64.0 MiB; lower slots \(--slots\) or max_len",
    ):
        Engine(model, slots=4096)
    Engine(model, slots=4)  # 128 KiB of cache: fine
    with pytest.raises(ValueError, match=r"the KV cache \(1 prompts x 2147483647 slots\)"):
        generate(model, [[1, 2]], max_new_tokens=4, max_len=2**31 - 1)
    assert generate(model, [[1, 2]], max_new_tokens=4).tokens.shape == (1, 4)
