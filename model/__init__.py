"""arjax.model: the decoder-only transformer, its config presets, its KV cache, and where its arrays live.

config.py        ModelConfig (frozen, strict), presets (get_config), and the strict loader
                 (check_field_types, strict_from_dict) every config of arjax uses
transformer.py   Transformer: model(tokens, positions, cache) -> (logits, cache), one call for
                 training, prefill and decode; attention_mask, rope, count_params
attention.py     the uncached attention: the backend's fused kernel (cuDNN, Pallas) or XLA's
cache.py         KVCache (static shape, heads-major; float or int8 with per-token scales) and init_cache
params.py        the one table of parameter roles (kind, logical axes, weight decay, int8) and
                 the one key-path helper (path_names, path_str)
sharding.py      meshes, the preset rules tables (logical axes -> mesh axes), Plan, many hosts
memory.py        what a command will need in memory, checked against the host and devices
rng.py           JAX keys and numpy generators from any Python int seed
int8.py          the int8 numerics: the symmetric quantizer, the matmul barrier, the int8 cache write
quant.py         quantize(model, "int8"): int8 weights for decoding (QuantLinear, QuantEmbed)
hf.py            Hugging Face GPT-2 / Llama conversion tables, safetensors in and out
"""

from arjax.model.cache import KVCache, init_cache
from arjax.model.config import PRESETS, ModelConfig, get_config
from arjax.model.quant import quantize
from arjax.model.transformer import Transformer, attention_mask, count_params, rope

__all__ = [
    "PRESETS",
    "ModelConfig",
    "get_config",
    "KVCache",
    "init_cache",
    "Transformer",
    "attention_mask",
    "count_params",
    "rope",
    "quantize",
]
