"""Hugging Face interop: config mapping and explicit weight-conversion tables for GPT-2 and Llama-family checkpoints."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.model.config import ModelConfig
from arjax.model.memory import check_needs, param_needs
from arjax.model.transformer import Transformer

# model_type in config.json -> our family. Mistral shares Llama's layout (plus a sliding window,
# which we accept only when it never binds); Qwen2 adds q/k/v biases, which we refuse below.
_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama"}
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# Buffers some checkpoints carry that are not weights (causal-mask tables, RoPE frequencies).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


# ---------------------------------------------------------------------------------------------
# Config mapping


def _refuse(model_type: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{model_type} config has {field}={value!r}: {why}; arjax cannot load this checkpoint exactly")


_REQUIRED = object()


def _num(hf: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED):
    """``hf[key]`` as an int or float, with an error naming the key when it is missing or not a number."""
    v = hf.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ValueError(
                f"config.json has no {key!r}, which a {hf.get('model_type')} config needs; the file is incomplete "
                "(save the model again with transformers' save_pretrained)"
            )
        return default
    whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (kind is int and not whole):
        raise ValueError(
            f"config.json has {key}={v!r}; it should be {'an integer' if kind is int else 'a finite number'}"
        )
    return kind(v)


def _rope(hf: dict, model_type: str) -> float:
    """rope_theta from transformers 5 ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling and not params:
        params = scaling
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise _refuse(model_type, "rope_type", rope_type, "only plain RoPE is implemented (no scaled RoPE variants)")
    if scaling and scaling is not params and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise _refuse(model_type, "rope_scaling", scaling, "only plain RoPE is implemented")
    return _num(params, "rope_theta", float, None) or _num(hf, "rope_theta", float, 10000.0)


def hf_family(hf: Mapping[str, Any]) -> str:
    """The conversion table a config.json needs ("gpt2" or "llama"), or a ValueError saying why none fits."""
    model_type = hf.get("model_type")
    if model_type == "qwen2":
        raise ValueError(
            "qwen2 checkpoints have biases on the q/k/v projections only; arjax's use_bias switches all "
            "projection biases together, so Qwen2 is not supported (supported model_type: gpt2, llama, mistral)"
        )
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json; arjax converts {sorted(_MODEL_TYPES)} "
            "(GPT2LMHeadModel, LlamaForCausalLM and Llama-layout models)"
        )
    archs = hf.get("architectures") or [_ARCHITECTURES[model_type]]
    if list(archs) != [_ARCHITECTURES[model_type]]:
        raise ValueError(
            f"unsupported architectures {archs} for model_type {model_type!r}; only the causal LM head "
            f"{_ARCHITECTURES[model_type]} can be converted"
        )
    return _MODEL_TYPES[model_type]


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json dict; anything we cannot reproduce is a ValueError."""
    hf = dict(hf)
    family, model_type = hf_family(hf), hf["model_type"]
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise _refuse(model_type, "layer_types", sorted(set(layer_types)), "only full causal attention is implemented")
    if family == "gpt2":
        checks = {
            "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_weights": (True,),
            "scale_attn_by_inverse_layer_idx": (False,),
            "reorder_and_upcast_attn": (False,),
            "add_cross_attention": (False,),
        }
        defaults = {"activation_function": "gelu_new", "scale_attn_weights": True}
        for field, allowed in checks.items():
            value = hf.get(field, defaults.get(field, False))
            if value not in allowed:
                raise _refuse(model_type, field, value, f"arjax implements only {allowed[0]!r}")
        d_model = _num(hf, "n_embd", int)
        return ModelConfig(
            vocab_size=_num(hf, "vocab_size", int),
            max_len=_num(hf, "n_positions", int),
            n_layers=_num(hf, "n_layer", int),
            n_heads=_num(hf, "n_head", int),
            d_model=d_model,
            d_ff=_num(hf, "n_inner", int, None) or 4 * d_model,
            pos="learned",
            norm="layernorm",
            norm_eps=_num(hf, "layer_norm_epsilon", float, 1e-5),
            mlp="gelu",
            use_bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            raise _refuse(model_type, field, True, "arjax's Llama layout has no projection biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(model_type, "hidden_act", hf["hidden_act"], "arjax's SwiGLU uses silu")
    max_len = _num(hf, "max_position_embeddings", int)
    window = _num(hf, "sliding_window", int, None)
    if window is not None and hf.get("use_sliding_window", True) and window < max_len:
        raise _refuse(
            model_type,
            "sliding_window",
            window,
            f"sliding-window attention is not implemented (it would bind below max_position_embeddings={max_len}); "
            "set sliding_window to null only if the model was trained without it",
        )
    d_model, n_heads = _num(hf, "hidden_size", int), _num(hf, "num_attention_heads", int)
    return ModelConfig(
        vocab_size=_num(hf, "vocab_size", int),
        max_len=max_len,
        n_layers=_num(hf, "num_hidden_layers", int),
        n_heads=n_heads,
        n_kv_heads=_num(hf, "num_key_value_heads", int, None) or n_heads,
        d_model=d_model,
        head_dim=_num(hf, "head_dim", int, None) or d_model // max(n_heads, 1),
        d_ff=_num(hf, "intermediate_size", int),
        pos="rope",
        rope_theta=_rope(hf, model_type),
        norm="rmsnorm",
        norm_eps=_num(hf, "rms_norm_eps", float, 1e-6),
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def family_of(cfg: ModelConfig) -> str:
    """Which HF layout can hold this config exactly: GPT-2 (learned/LayerNorm/GELU) or Llama (RoPE/RMSNorm/SwiGLU)."""
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.num_kv_heads == cfg.n_heads:
        if cfg.dim_per_head * cfg.n_heads != cfg.d_model:
            raise ValueError(
                f"GPT-2 needs head_dim * n_heads == d_model, got head_dim={cfg.dim_per_head}; no HF layout fits"
            )
        return "gpt2"  # use_bias=False exports exactly as GPT-2 with zero biases
    if cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        if cfg.use_bias:
            raise ValueError(
                "a Llama-layout model with use_bias=True has no exact HF equivalent; train with use_bias=False"
            )
        return "llama"
    raise ValueError(
        f"no Hugging Face layout matches pos={cfg.pos!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r}, "
        f"n_kv_heads={cfg.num_kv_heads}: export needs GPT-2 (learned, layernorm, gelu, no GQA) or "
        "Llama (rope, rmsnorm, swiglu)"
    )


def config_to_hf(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The config.json transformers needs to rebuild this model (``extra``: e.g. eos/bos/pad token ids)."""
    family = family_of(cfg)
    if family == "gpt2":
        hf = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ff_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None,
            "eos_token_id": None,
        }
    else:
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_len,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ff_dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.dim_per_head,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_theta": cfg.rope_theta,  # transformers 4 reads this key
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None,
            "eos_token_id": None,
        }
    hf["torch_dtype"] = "float32"
    hf.update(extra)
    return hf


# ---------------------------------------------------------------------------------------------
# Conversion tables: one row per HF tensor, naming our parameter(s) and the transform between them.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """HF tensor ``hf`` <-> our parameter(s) ``ours`` (paths into the nnx.State)."""

    hf: str
    ours: tuple[tuple, ...]
    kind: str  # "copy" (same layout), "transpose" (torch Linear [out, in] vs our [in, out]), "split3" (GPT-2 c_attn)
    zero_if_absent: bool = False  # GPT-2 biases of a use_bias=False model export as zeros


_TO_OURS: dict[str, Callable[[np.ndarray], list[np.ndarray]]] = {
    "copy": lambda x: [x],
    "transpose": lambda x: [x.T],
    "split3": lambda x: np.split(x, 3, axis=-1),  # [D, 3D] -> q, k, v each [D, D]; bias [3D] -> 3 x [D]
}
_TO_HF: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "copy": lambda xs: xs[0],
    "transpose": lambda xs: xs[0].T,
    "split3": lambda xs: np.concatenate(xs, axis=-1),
}


def conversion_table(cfg: ModelConfig) -> list[Rule]:
    """Every HF tensor of this model's family and where it lives in ours (nanoGPT ``from_pretrained`` style)."""
    family = family_of(cfg)
    rules: list[Rule] = []
    b = cfg.use_bias  # our model has biases; if not (GPT-2 family only), HF gets zeros
    if family == "gpt2":
        rules.append(Rule(hf="transformer.wte.weight", ours=(("embed", "embedding"),), kind="copy"))
        rules.append(Rule(hf="transformer.wpe.weight", ours=(("pos_embed", "embedding"),), kind="copy"))

        def norm(hf_name, ours):
            rules.append(Rule(hf=f"{hf_name}.weight", ours=((*ours, "scale"),), kind="copy"))
            rules.append(
                Rule(hf=f"{hf_name}.bias", ours=((*ours, "bias"),) if b else (), kind="copy", zero_if_absent=not b)
            )

        def conv1d(hf_name, ours_list, kind):  # GPT-2 Conv1D weights are already [in, out]
            rules.append(Rule(hf=f"{hf_name}.weight", ours=tuple((*o, "kernel") for o in ours_list), kind=kind))
            rules.append(
                Rule(
                    hf=f"{hf_name}.bias",
                    ours=tuple((*o, "bias") for o in ours_list) if b else (),
                    kind=kind,
                    zero_if_absent=not b,
                )
            )

        for i in range(cfg.n_layers):
            h, o = f"transformer.h.{i}", ("blocks", i)
            norm(f"{h}.ln_1", (*o, "ln1"))
            conv1d(f"{h}.attn.c_attn", [(*o, "attn", "q"), (*o, "attn", "k"), (*o, "attn", "v")], "split3")
            conv1d(f"{h}.attn.c_proj", [(*o, "attn", "o")], "copy")
            norm(f"{h}.ln_2", (*o, "ln2"))
            conv1d(f"{h}.mlp.c_fc", [(*o, "mlp", "up")], "copy")
            conv1d(f"{h}.mlp.c_proj", [(*o, "mlp", "down")], "copy")
        norm("transformer.ln_f", ("ln_f",))
        if not cfg.tie_embeddings:
            rules.append(Rule(hf="lm_head.weight", ours=(("lm_head", "kernel"),), kind="transpose"))
        return rules

    rules.append(Rule(hf="model.embed_tokens.weight", ours=(("embed", "embedding"),), kind="copy"))
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}", ("blocks", i)
        rules.append(Rule(hf=f"{h}.input_layernorm.weight", ours=((*o, "ln1", "scale"),), kind="copy"))
        for name in "qkvo":
            rules.append(
                Rule(hf=f"{h}.self_attn.{name}_proj.weight", ours=((*o, "attn", name, "kernel"),), kind="transpose")
            )
        rules.append(Rule(hf=f"{h}.post_attention_layernorm.weight", ours=((*o, "ln2", "scale"),), kind="copy"))
        for name in ("gate", "up", "down"):
            rules.append(Rule(hf=f"{h}.mlp.{name}_proj.weight", ours=((*o, "mlp", name, "kernel"),), kind="transpose"))
    rules.append(Rule(hf="model.norm.weight", ours=(("ln_f", "scale"),), kind="copy"))
    if not cfg.tie_embeddings:
        rules.append(Rule(hf="lm_head.weight", ours=(("lm_head", "kernel"),), kind="transpose"))
    return rules


def _canonical_name(name: str, family: str) -> str:
    # The original GPT-2 checkpoints were saved from GPT2Model, without the "transformer." prefix.
    if family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def model_from_hf_tensors(
    hf_config: Mapping[str, Any], tensors: Mapping[str, Any], *, source: str = "checkpoint"
) -> Transformer:
    """A Transformer holding the given HF weights (name -> array); every tensor's shape is checked."""
    cfg = config_from_hf(hf_config)
    family = family_of(cfg)
    tensors = {_canonical_name(k, family): v for k, v in tensors.items()}
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    filled: set[tuple] = set()
    used: set[str] = set()
    for rule in conversion_table(cfg):
        if not rule.ours:
            used.add(rule.hf)  # a bias our model does not have; nothing to load
            continue
        if rule.hf not in tensors:
            raise ValueError(f"{source} lacks tensor {rule.hf!r} that a {family} model with this config.json needs")
        x = np.asarray(tensors[rule.hf], dtype=np.float32)
        used.add(rule.hf)
        ours = [flat[p] for p in rule.ours]
        want = _TO_HF[rule.kind]([np.empty(v.shape, np.float32) for v in ours]).shape
        if x.shape != want:
            raise ValueError(
                f"{source}: tensor {rule.hf!r} has shape {tuple(x.shape)} but config.json implies {tuple(want)}; "
                "the weights and config.json do not belong together"
            )
        for path, var, value in zip(rule.ours, ours, _TO_OURS[rule.kind](x)):
            var.set_value(jnp.asarray(value, dtype=var.dtype))
            filled.add(path)
    missing = set(flat) - filled
    assert not missing, f"conversion table misses parameters {sorted(missing)}"  # a bug in this file, not user input
    extra = sorted(
        k
        for k in set(tensors) - used
        if not k.endswith(_IGNORED_SUFFIXES) and not (k == "lm_head.weight" and cfg.tie_embeddings)
    )
    if extra:
        raise ValueError(
            f"{source} has tensors arjax does not know how to use: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """HF-named float32 numpy tensors for this model (inverse of ``model_from_hf_tensors``)."""
    cfg = model.cfg
    flat = {p: np.asarray(v.get_value(), dtype=np.float32) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for rule in conversion_table(cfg):
        if rule.ours:
            out[rule.hf] = np.ascontiguousarray(_TO_HF[rule.kind]([flat[p] for p in rule.ours]))
        else:  # zero biases: a bias-free model is exactly GPT-2 with zeros there
            out[rule.hf] = np.zeros(_zero_bias_shape(rule.hf, cfg), np.float32)
    return out


def _zero_bias_shape(hf_name: str, cfg: ModelConfig) -> tuple[int, ...]:
    if ".c_attn." in hf_name:
        return (3 * cfg.d_model,)
    if ".c_fc." in hf_name:
        return (cfg.ff_dim,)
    return (cfg.d_model,)


# ---------------------------------------------------------------------------------------------
# Directories and live transformers models


def read_hf_config(directory: str) -> dict[str, Any]:
    """config.json of an HF directory as a dict; a missing or malformed file is a ValueError naming it."""
    if not os.path.isdir(directory):
        raise ValueError(
            f"{directory!r} is not a directory; pass a Hugging Face model directory (config.json + *.safetensors)"
        )
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"no config.json in {directory!r}; pass a Hugging Face model directory (config.json + *.safetensors)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); save the model again with transformers' save_pretrained"
        ) from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a {type(hf).__name__}, not a mapping of config keys")
    return hf


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{index} is not a valid safetensors index (a weight_map of tensor -> file): {e!r}"
            ) from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise ValueError(f"{index} names shards that are not in {directory!r}: {missing[:3]}")
        return [os.path.join(directory, s) for s in shards]
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        return files
    pickles = [os.path.basename(p) for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(directory, pat))]
    if pickles:
        raise ValueError(
            f"{directory!r} holds only pickle checkpoints {sorted(pickles)}; arjax never unpickles (it can run "
            "arbitrary code). Convert to safetensors first, e.g. in transformers: "
            "model.save_pretrained(out_dir, safe_serialization=True)"
        )
    raise ValueError(f"no *.safetensors weights in {directory!r}")


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint as numpy arrays; torch is not needed."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in _safetensors_files(directory):
        try:
            try:
                with safe_open(path, framework="np") as f:
                    for key in f.keys():  # noqa: SIM118 (a safe_open handle has keys() but is not iterable)
                        tensors[key] = f.get_tensor(key)
            except (TypeError, ValueError):
                # numpy has no bfloat16; read through jax (ml_dtypes) and widen to float32.
                with safe_open(path, framework="flax") as f:
                    for key in f.keys():  # noqa: SIM118 (a safe_open handle has keys() but is not iterable)
                        tensors[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
        except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, OSError, ... for damaged files)
            raise ValueError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated: "
                "download or save it again"
            ) from None
    return tensors


def from_hf_dir(directory: str) -> Transformer:
    """Load a local HF checkpoint directory (config.json + *.safetensors, sharded or not)."""
    hf_config = read_hf_config(directory)
    where = os.path.join(directory, "config.json")
    try:
        cfg = config_from_hf(hf_config)  # refuse unsupported configs before reading gigabytes of weights
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    # A config.json that claims sizes no machine holds is one line, not an allocation failure.
    try:
        check_needs(param_needs(cfg, what="the float32 weights"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return model_from_hf_tensors(hf_config, read_safetensors(directory), source=directory)


def from_hf_model(hf_model) -> Transformer:
    """Convert a live transformers PyTorch model (GPT2LMHeadModel, LlamaForCausalLM, ...)."""
    hf_config = hf_model.config.to_dict()
    # The live object's class is the truth (a GPT2Model without its LM head is refused by name).
    hf_config["architectures"] = [type(hf_model).__name__]
    tensors = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    return model_from_hf_tensors(hf_config, tensors, source=type(hf_model).__name__)


def to_hf_dir(model: Transformer, directory: str, **config_extra: Any) -> None:
    """Write config.json + model.safetensors that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    hf = config_to_hf(model.cfg, **config_extra)
    tensors = model_to_hf_tensors(model)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.safetensors")
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except Exception as e:  # safetensors reports OS failures as its own SafetensorError
        if "os error" in str(e):
            code = int(re.search(r"os error (\d+)", str(e)).group(1))
            raise OSError(code, os.strerror(code), path) from None
        raise
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)


__all__ = [
    "Rule",
    "config_from_hf",
    "config_to_hf",
    "conversion_table",
    "family_of",
    "from_hf_dir",
    "from_hf_model",
    "hf_family",
    "model_from_hf_tensors",
    "model_to_hf_tensors",
    "read_hf_config",
    "read_safetensors",
    "to_hf_dir",
]
