"""arjax.decode: prefill, the jitted while_loop decoder, and samplers.

sampling.py   SAMPLING_FIELDS: the one spec of per-request sampling fields (type, bounds, default,
              help, HTTP name) that SamplingParams, the engine's Request, the CLI flags, batch
              lines and the HTTP body derive from; check_sampling_field (the one check, a
              FieldError naming the field); SamplingParams (per-row traced values),
              filter_logits (HF's pipeline), sample
loop.py       DecodeState, the pure decode_step, prefill, and generate / stream / stream_text
              (one jitted prefill + lax.while_loop, bucketed shapes)
speculative.py  DraftModel, PromptLookup: speculative decoding in the same jitted loop
stops.py      stop strings, checked on the decoded text between chunks
engine.py     Engine: continuous batching over a fixed set of slots (requests join between chunks)
chat.py       chat messages to a prompt: the tokenizer's own Jinja chat template, or the default one
server.py     the OpenAI-compatible HTTP server over the engine: completions and chat (FastAPI; the
              "serve" extra)
"""

from arjax.decode.loop import (
    DEFAULT_BUCKETS,
    DecodeState,
    GenerateOutput,
    bucket,
    decode_step,
    generate,
    init_state,
    prefill,
    stream,
    stream_text,
)
from arjax.decode.sampling import (
    SAMPLING_FIELDS,
    FieldError,
    SamplingField,
    SamplingParams,
    apply_repetition_penalty,
    check_sampling_field,
    filter_logits,
    sample,
)
from arjax.decode.speculative import DraftModel, PromptLookup

__all__ = [
    "SAMPLING_FIELDS",
    "FieldError",
    "SamplingField",
    "SamplingParams",
    "check_sampling_field",
    "apply_repetition_penalty",
    "filter_logits",
    "sample",
    "DEFAULT_BUCKETS",
    "DecodeState",
    "GenerateOutput",
    "bucket",
    "decode_step",
    "generate",
    "init_state",
    "prefill",
    "stream",
    "stream_text",
    "DraftModel",
    "PromptLookup",
]
