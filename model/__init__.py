"""arjax.model: the decoder-only transformer, its config presets and its KV cache."""

from arjax.model.config import PRESETS, ModelConfig, get_config
from arjax.model.cache import KVCache, init_cache
from arjax.model.transformer import Transformer, attention_mask, count_params, rope

__all__ = ["PRESETS", "ModelConfig", "get_config", "KVCache", "init_cache", "Transformer", "attention_mask", "count_params", "rope"]
