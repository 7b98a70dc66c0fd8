"""Model config: presets build, overrides are strict, derived sizes are right."""

import jax
import pytest
from flax import nnx

from arjax.model import PRESETS, Transformer, count_params, get_config
from arjax.model.config import from_dict


def test_presets_have_expected_shapes():
    gpt2 = get_config("gpt2-small")
    assert (gpt2.n_layers, gpt2.n_heads, gpt2.d_model, gpt2.max_len, gpt2.vocab_size) == (12, 12, 768, 1024, 50257)
    # The exact parameter count of Hugging Face's GPT-2 small.
    assert count_params(gpt2) == 124_439_808
    sc = get_config("shakespeare-char")
    assert (sc.n_layers, sc.n_heads, sc.d_model, sc.max_len) == (6, 6, 384, 256)
    llama = get_config("llama-small")
    assert llama.pos == "rope" and llama.norm == "rmsnorm" and llama.mlp == "swiglu"
    assert llama.num_kv_heads < llama.n_heads and not llama.tie_embeddings


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_abstractly(name):
    cfg = get_config(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((2, 8), "int32")
    logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t)[0], state, tokens)
    assert logits.shape == (2, 8, cfg.vocab_size)


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError, match="unknown ModelConfig keys \\['n_layer'\\]"):
        get_config("tiny", n_layer=3)
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        get_config("gpt3")
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        from_dict({**get_config("tiny").to_dict(), "bogus": 1})


def test_bad_values_are_errors():
    with pytest.raises(TypeError, match="n_layers"):
        get_config("tiny", n_layers="2")
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        get_config("tiny", norm="batchnorm")
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads=3"):
        get_config("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        get_config("tiny", dropout=1.5)


def test_round_trip_through_dict():
    cfg = get_config("llama-small", n_layers=2)
    assert from_dict(cfg.to_dict()) == cfg
