"""arjax.model: the decoder-only transformer, its config presets and its KV cache.

    config.py        ModelConfig (frozen, strict), presets (get_config), and the strict loader
                     (check_field_types, strict_from_dict) every config of arjax uses
    transformer.py   Transformer: model(tokens, positions, cache) -> (logits, cache), one call for
                     training, prefill and decode; attention_mask, rope, count_params
    cache.py         KVCache (static shape, heads-major; float or int8 with per-token scales) and init_cache
    quant.py         quantize(model, "int8"): int8 weights for decoding; the int8 KV cache's quantizer
    hf.py            Hugging Face GPT-2 / Llama conversion tables, safetensors in and out
"""

from arjax.model.config import PRESETS, ModelConfig, get_config
from arjax.model.cache import KVCache, init_cache
from arjax.model.transformer import Transformer, attention_mask, count_params, rope
from arjax.model.quant import quantize

__all__ = ["PRESETS", "ModelConfig", "get_config", "KVCache", "init_cache", "Transformer", "attention_mask", "count_params", "rope", "quantize"]
