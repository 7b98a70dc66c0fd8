"""The one table of parameter roles: each parameter keeps its axes, weight decay and int8 decision; HF agrees."""

import itertools

import jax
import pytest
from flax import nnx

from arjax.model import hf, params, quantize, sharding
from arjax.model.config import PRESETS, get_config
from arjax.model.transformer import Transformer
from arjax.train.optim import decay_mask

# What sharding's own table said before the roles table (model/sharding.py, _AXES_BY_NAME), written out.
AXES_BEFORE = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("pos_embed", "embedding"): (None, "embed"),
    ("q", "kernel"): ("embed", "heads"),
    ("q", "bias"): ("heads",),
    ("k", "kernel"): ("embed", "kv_heads"),
    ("k", "bias"): ("kv_heads",),
    ("v", "kernel"): ("embed", "kv_heads"),
    ("v", "bias"): ("kv_heads",),
    ("o", "kernel"): ("heads", "embed"),
    ("o", "bias"): ("embed",),
    ("gate", "kernel"): ("embed", "mlp"),
    ("gate", "bias"): ("mlp",),
    ("up", "kernel"): ("embed", "mlp"),
    ("up", "bias"): ("mlp",),
    ("down", "kernel"): ("mlp", "embed"),
    ("down", "bias"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
    **{(norm, p): ("embed",) for norm in ("ln1", "ln2", "ln_f") for p in ("scale", "bias")},
}


def decays_before(names: list[str], decay_embeddings: bool) -> bool:
    """The optimizer's rule before the table (train/optim.py): by names anywhere in the path."""
    if any(n in ("ln1", "ln2", "ln_f") for n in names) or "bias" in names:
        return False
    if any(n in ("embed", "pos_embed") for n in names):
        return decay_embeddings
    return True


# What quantize swapped before the table (model/quant.py): every Linear of attention and the MLP,
# an untied lm_head (QuantLinear) and the token embedding (QuantEmbed).
QUANTIZED_BEFORE = {
    ("q", "kernel"),
    ("k", "kernel"),
    ("v", "kernel"),
    ("o", "kernel"),
    ("gate", "kernel"),
    ("up", "kernel"),
    ("down", "kernel"),
    ("lm_head", "kernel"),
    ("embed", "embedding"),
}


def _configs():
    """Every preset, and the tiny one with every combination of the family switches (biases, tying,
    MLP, positions, norms): the parameter names depend on those alone."""
    for name in sorted(PRESETS):
        yield name, get_config(name)
    switches = {
        "use_bias": (True, False),
        "tie_embeddings": (True, False),
        "mlp": ("gelu", "swiglu"),
        "pos": ("learned", "rope"),
        "norm": ("layernorm", "rmsnorm"),
    }
    for values in itertools.product(*switches.values()):
        overrides = dict(zip(switches, values))
        yield f"tiny {overrides}", get_config("tiny", n_layers=1, **overrides)


def _param_paths(cfg):
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return state, [p for p, _ in jax.tree_util.tree_leaves_with_path(state)]


def test_every_parameter_of_every_preset_keeps_its_axes_decay_and_int8_decision():
    checked = 0
    for label, cfg in _configs():
        state, paths = _param_paths(cfg)
        masks = {
            de: dict(jax.tree_util.tree_leaves_with_path(decay_mask(state, decay_embeddings=de)))
            for de in (False, True)
        }
        for path in paths:
            names = [n for n in params.path_names(path) if n != "value"]
            key = tuple(names[-2:])
            assert sharding.logical_axes(path) == AXES_BEFORE[key], (label, names)
            for de in (False, True):
                assert masks[de][path] is decays_before(names, de), (label, names, de)
            assert params.role(path).quantized == (key in QUANTIZED_BEFORE), (label, names)
            checked += 1
    assert checked > 500


def test_quantize_swaps_exactly_the_parameters_the_table_marks():
    for cfg in (get_config("tiny"), get_config("tiny", tie_embeddings=False, mlp="swiglu", use_bias=False)):
        q = nnx.state(quantize(Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        flat = dict(nnx.to_flat_state(q))
        int8 = {path for path, var in flat.items() if var.get_value().dtype.name == "int8"}
        scaled = {path[:-1] for path in flat if path[-1] == "scale" and path[-2] not in ("ln1", "ln2", "ln_f")}
        float_paths = [p for p, _ in nnx.to_flat_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))]
        marked = {p for p in float_paths if params.role(p).quantized}
        assert int8 == marked and scaled == {p[:-1] for p in marked}


def test_every_parameter_has_a_role_and_a_missing_one_says_where_to_add_it():
    for name in sorted(PRESETS):
        _, paths = _param_paths(get_config(name))
        for path in paths:
            assert params.role(path).kind in params.KINDS
    with pytest.raises(ValueError, match=r"'blocks/0/attn/r/kernel' has no role in arjax.model.params; add .* ROLES"):
        params.role(("blocks", 0, "attn", "r", "kernel"))


def test_hf_tables_agree_with_the_roles():
    """HF conversion keeps its own per-family table; what it converts has a role, and only kernels transpose."""
    for cfg in (
        get_config("tiny"),
        get_config("tiny", tie_embeddings=False),
        get_config("llama-small", n_layers=1, vocab_size=64, d_model=64),
    ):
        for rule in hf.conversion_table(cfg):
            for path in rule.ours:
                role = params.role(path)
                if rule.kind == "transpose":
                    assert role.kind == "kernel", rule
                if rule.kind == "split3":  # GPT-2's c_attn: the q, k and v of one block
                    assert path[-2] in ("q", "k", "v"), rule


def test_path_names_read_every_kind_of_key():
    path = (
        jax.tree_util.DictKey("blocks"),
        jax.tree_util.SequenceKey(0),
        jax.tree_util.GetAttrKey("attn"),
        jax.tree_util.FlattenedIndexKey(3),
    )
    assert params.path_names(path) == ["blocks", "0", "attn", "3"]
    assert params.path_str(path) == "blocks/0/attn/3"
    assert params.path_str(("blocks", 1, "mlp", "up", "kernel")) == "blocks/1/mlp/up/kernel"
    ln_f = (jax.tree_util.DictKey("ln_f"), jax.tree_util.DictKey("scale"), jax.tree_util.GetAttrKey("value"))
    assert params.role(ln_f).kind == "norm"
