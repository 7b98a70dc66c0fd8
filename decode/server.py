"""An OpenAI-compatible HTTP front for the engine (FastAPI + uvicorn): /v1/completions, /v1/chat/completions,
/v1/models, /health.

The engine's thread owns the device; request handlers only submit requests and wait on an
asyncio queue that the engine's callback fills (``call_soon_threadsafe``), so nothing on the
network ever blocks the decode loop. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (naming the field and
its range: a sampling field's refusal is ``check_sampling_field``'s line, as from Python, a flag or a
batch line), 404 for another model name, 429 when the queue is full, 503 when shutting down, 500 when
decoding failed. ``finish_reason`` is only ever "stop" (EOS or a stop string) or "length": a request the
engine ends otherwise (the server shutting down, a failed round) fails the response instead, as an error
response or, in a stream already under way, an error event (``data: {"error": {...}}``, its ``code`` the
HTTP status it would have had) before ``data: [DONE]``.

Chat requests are rendered to a prompt by ``arjax.decode.chat`` (the tokenizer's own template, or the
default one) and decoded like a completion of it.

``create_app`` wires the module-level handlers to an engine (``app.state``); ``bind`` takes the
socket (before the model loads, so a taken port fails at once); ``serve`` runs it all until a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from arjax.decode.chat import ChatTemplate, check_messages
from arjax.decode.engine import TOP_LOGPROBS, Engine, QueueFull, Request, Update
from arjax.decode.sampling import SAMPLING_FIELDS, FieldError, SamplingField, check_sampling_field

MAX_BODY = 16 << 20  # bytes of one request body: far beyond any prompt a slot can hold
DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens: OpenAI's default there
# The engine's reasons -> OpenAI's finish_reason. The engine's other two end the whole response instead.
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
FAILURES = {
    "cancelled": (503, "the server is shutting down; retry on another"),  # Engine.close(): SIGINT / SIGTERM
    "error": (500, "decoding failed on the server (its log says why); retry"),
}
ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health"
# Our field names -> the body's (OpenAI's), where they differ: what a 400's ``param`` names.
_SAMPLING_NAMES = {f.name: f.http for f in SAMPLING_FIELDS}
HTTP_NAMES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs", **_SAMPLING_NAMES}  # /v1/completions
# OpenAI chat fields this server does not implement: what they are for, and the values that ask for nothing.
CHAT_UNSUPPORTED = {
    "tools": ("tool calling", (None, [])),
    "tool_choice": ("tool calling", (None, "none")),
    "parallel_tool_calls": ("tool calling", (None,)),
    "functions": ("function calling", (None, [])),
    "function_call": ("function calling", (None, "none")),
    "response_format": ("structured output: JSON mode and schemas", (None, {"type": "text"})),
    "audio": ("audio output", (None,)),
    "modalities": ("output other than text", (None, ["text"])),
    "prediction": ("predicted outputs", (None,)),
}


def _sampling_field(f: SamplingField):
    """A body field for one sampling field: checked by ``check_sampling_field`` itself, so a value is refused
    with the same line as from Python, a flag or a batch line (types included)."""
    return Annotated[
        Any, AfterValidator(lambda value: check_sampling_field(f.name, value)), Field(description=f.help)
    ], f.default


class StreamOptions(BaseModel):
    """``stream_options`` (with ``stream``): ``include_usage`` sends one more chunk before ``[DONE]``, with
    ``choices: []`` and the request's ``usage``; every other chunk then carries ``usage: null``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


def _shared_fields() -> dict:
    """The body fields both routes take, after their own: sampling, n, streaming, stops, seed."""
    return {
        **{f.http: _sampling_field(f) for f in SAMPLING_FIELDS},
        "n": (Annotated[int, Field(ge=1, le=64)], 1),
        "stream": (bool, False),
        "stream_options": (StreamOptions | None, None),
        "stop": (str | Annotated[list[str], Field(max_length=16)] | None, None),
        "seed": (int | None, None),
        "user": (str | None, None),
        # OpenAI fields we do not implement: accepted only at their neutral values.
        "presence_penalty": (Literal[0, 0.0], 0.0),
        "frequency_penalty": (Literal[0, 0.0], 0.0),
        "logit_bias": (Annotated[dict, Field(max_length=0)] | None, None),
    }


_STRICT = ConfigDict(extra="forbid", strict=True)
CompletionRequest = create_model(
    "CompletionRequest",
    __config__=_STRICT,
    __doc__="The body of ``POST /v1/completions``: OpenAI's fields we honour, plus top_k, min_p and "
    "repetition_penalty. Unknown fields are refused (a misspelt ``temprature`` must not be ignored "
    'silently); numbers are strict (no ``"0.5"`` strings). ``prompt``: a string, a list of strings, a list '
    "of token ids (one prompt) or a list of lists of token ids.",
    __module__=__name__,
    model=(str, ...),
    prompt=(
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[list[int]], Field(min_length=1)],
        ...,
    ),
    max_tokens=(Annotated[int, Field(ge=0, lt=2**31)] | None, DEFAULT_MAX_TOKENS),
    **_shared_fields(),
    logprobs=(Annotated[int, Field(ge=0, le=TOP_LOGPROBS)] | None, None),
    echo=(bool, False),
    best_of=(Literal[1] | None, None),
    suffix=(Literal[""] | None, None),
)

ChatRequest = create_model(
    "ChatCompletionRequest",
    __config__=_STRICT,
    __doc__="The body of ``POST /v1/chat/completions``: ``messages`` (checked by ``chat.check_messages``, "
    "whose refusals name the message), the shared fields, ``logprobs`` (bool) and ``top_logprobs``. "
    "``max_completion_tokens`` and its deprecated name ``max_tokens`` may both be sent only if equal; "
    "without either a reply may fill the slot. OpenAI's tool, function and format fields are refused.",
    __module__=__name__,
    model=(str, ...),
    messages=(Any, ...),  # checked by chat.check_messages, whose refusals name the message and its field
    max_completion_tokens=(Annotated[int, Field(ge=1, lt=2**31)] | None, None),
    max_tokens=(Annotated[int, Field(ge=1, lt=2**31)] | None, None),
    **_shared_fields(),
    logprobs=(bool | None, None),
    top_logprobs=(Annotated[int, Field(ge=0, le=TOP_LOGPROBS)] | None, None),
    **{name: (Any, None) for name in CHAT_UNSUPPORTED},
)
# What each body is for: its path, and what the smallest one looks like.
_BODIES = {
    CompletionRequest: ("/v1/completions", '{"model": ..., "prompt": "..."}'),
    ChatRequest: ("/v1/chat/completions", '{"model": ..., "messages": [{"role": "user", "content": "..."}]}'),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: the handlers'
    helpers raise it; the app's handler (``_api_error``) turns it into the response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={"error": {"message": message, "type": kind, "param": param, "code": None}},
    )


_UNION_FIELDS = {
    "prompt": "a string, a non-empty list of strings, a list of token ids (ints) or a list of lists of token ids",
    "stop": "a string or a list of at most 16 strings",
}


def _where(loc: tuple) -> str:
    """A place in the body as a user writes it: ``prompt[1]``, ``stream_options.include_usage`` (a union's
    branch names, which pydantic puts in ``loc``, are no place)."""
    field = str(loc[0])
    parts = [p for p in loc[1:] if isinstance(p, int) or field not in _UNION_FIELDS]
    return field + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _validation_message(errors: list[dict], body=CompletionRequest) -> tuple[str, str | None]:
    """One line naming the first bad field, what it must be and what it got (pydantic's ``errors()``)."""
    path, example = _BODIES[body]
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({first.get('msg', '')}); send a JSON object", None
    if not first.get("loc"):
        return f"the request body must be a JSON object, e.g. {example}", None
    field = str(first["loc"][0])
    refusal = (first.get("ctx") or {}).get("error")
    if isinstance(refusal, FieldError):  # a sampling field: check_sampling_field's own line
        return str(refusal), field
    if kind == "extra_forbidden":
        if len(first["loc"]) > 1:
            return f"unknown field {_where(first['loc'])!r}", field
        takes = ", ".join(f for f in body.model_fields if f not in CHAT_UNSUPPORTED)
        return f"unknown field {field!r}; {path} takes {takes}", field
    if kind == "literal_error" and field in ("presence_penalty", "frequency_penalty", "best_of", "suffix"):
        return f"{field} is not supported by this server; leave it out (repetition_penalty is)", field
    same = [e for e in errors if e.get("loc") and str(e["loc"][0]) == field]
    if field in _UNION_FIELDS:
        # One error per branch of the union: the one that is not a plain type mismatch says most.
        useful = [e for e in same if not str(e.get("type", "")).endswith("_type")]
        if not useful:
            return f"{field} must be {_UNION_FIELDS[field]}{_got(first)}", field
        first = useful[0]
    return f"{_where(first['loc'])}: {first.get('msg', 'invalid')}{_got(first)}", field


def _got(err: dict) -> str:
    got = err.get("input")
    if got is None or isinstance(got, (dict, list)):
        return ""
    try:
        return f" (got {json.dumps(got)[:80]})"
    except (TypeError, ValueError):
        return ""


def create_app(engine: Engine, tokenizer, model_id: str) -> FastAPI:
    """The FastAPI app serving ``engine`` (already warmed up and started) under the name ``model_id``.
    The handlers are this module's functions; they find the engine, tokenizer, chat template and name in
    ``app.state``. A tokenizer's chat template that does not compile is a ValueError here."""
    app = FastAPI(title="arjax", docs_url=None, redoc_url=None)
    app.state.engine, app.state.tokenizer, app.state.model_id = engine, tokenizer, model_id
    app.state.chat = ChatTemplate(tokenizer)
    app.state.created = int(time.time())
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(ApiError, _api_error)
    app.include_router(router)
    return app


async def _http_error(_, exc: StarletteHTTPException):
    """An unknown route or a wrong method: OpenAI's error shape."""
    return _error(
        exc.status_code,
        f"{exc.detail}; this server has {ROUTES}",
        None,
        "not_found_error" if exc.status_code == 404 else "invalid_request_error",
    )


async def _bad_request(_, exc: RequestValidationError):
    message, param = _validation_message(exc.errors())
    return _error(400, message, param)


async def _api_error(_, exc: ApiError):
    return _error(exc.status, exc.message, exc.param, exc.kind, exc.headers)


router = APIRouter()


@router.get("/health")
async def health(http: HTTPRequest):
    state = http.app.state
    engine = state.engine
    return {
        "status": "ok" if not engine.broken else f"broken: {engine.broken}",
        "model": state.model_id,
        "slots": engine.num_slots,
        "active": engine.active,
        "waiting": engine.waiting,
        "max_len": engine.max_len,
        "prefill_tokens": engine.stats["prefill_tokens"],
        "prefix_cache": None
        if engine.prefix is None
        else {
            "rows": len(engine.prefix.held),
            "lookups": engine.prefix.lookups,
            "hits": engine.prefix.hits,
            "tokens_reused": engine.prefix.tokens_reused,
        },
        "prompt_lookup": None
        if not engine.prompt_lookup
        else {
            "k": engine.prompt_lookup,
            "chunks": engine.stats["chunks"],
            "speculative_chunks": engine.stats["spec_chunks"],
            "accepted_drafts": engine.stats["spec_accepted"],
            "tokens": engine.stats["tokens"],
        },
    }


@router.get("/v1/models")
async def models(http: HTTPRequest):
    state = http.app.state
    return {
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": state.created, "owned_by": "arjax"}],
    }


@dataclasses.dataclass(eq=False)
class _Choice:
    """One choice of a response (one engine request) and what it has produced so far."""

    ids: list[int]  # the prompt's tokens
    echo: str = ""  # text shown before the completion (/v1/completions' echo)
    score_only: bool = False  # max_tokens=0 with echo: the one token the engine must decode is dropped
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)  # completion tokens so far (text offsets)
    logprobs: Any = None  # the route's logprobs object so far
    finish: str | None = None
    completion_tokens: int = 0
    started: bool = False  # an update has arrived


@router.post("/v1/completions")
async def completions(http: HTTPRequest):
    state = http.app.state
    body = await _read_body(http, CompletionRequest)
    if body is None:  # the client hung up before its body arrived: nobody to answer, nothing to log
        return Response(status_code=499)
    _check_model(body.model, state.model_id)
    include_usage = _include_usage(body)
    max_new = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_new == 0 and not body.echo:
        raise ApiError(
            400,
            "max_tokens=0 generates nothing; give max_tokens >= 1, or echo=true with logprobs to score the prompt",
            "max_tokens",
        )
    choices = []
    for where, text, ids in _prompts(body.prompt, state.tokenizer, state.engine.model.cfg.vocab_size):
        if max_new == 0 and len(ids) >= state.engine.max_len:
            raise ApiError(
                400,
                f"{where} has {len(ids)} tokens; scoring it (max_tokens=0) takes at most {state.engine.max_len - 1}",
                "prompt",
            )
        choices += [_Choice(ids=ids, echo=text if body.echo else "", score_only=max_new == 0) for _ in range(body.n)]
    k = body.logprobs
    queue: asyncio.Queue = asyncio.Queue()
    requests = _requests(
        choices,
        body,
        state.tokenizer,
        asyncio.get_running_loop(),
        queue,
        max_new=max(1, max_new),
        stops=_stops(body.stop),
        top_logprobs=k or 0,
        logprobs=k is not None,
        prompt_logprobs=k if body.echo else None,
    )
    handles = _submit(state.engine, requests, HTTP_NAMES)
    base = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_id,
    }
    if body.stream:
        events = _completion_events(queue, choices, body, base, state.tokenizer, include_usage)
        return _streaming(events, handles)
    try:
        async for index, update in _each_update(queue, choices, http):
            c = choices[index]
            if k is not None:
                c.logprobs = _merge_logprobs(c.logprobs, _completion_logprobs(c, update, state.tokenizer, body))
            c.text += update.text
    except _ClientGone:
        _cancel(handles)
        return JSONResponse(status_code=499, content={})
    except BaseException:  # a failed request (ApiError), or the handler cancelled: free every slot
        _cancel(handles)
        raise
    return {
        **base,
        "choices": [
            {"index": i, "text": c.echo + c.text, "logprobs": c.logprobs, "finish_reason": c.finish}
            for i, c in enumerate(choices)
        ],
        "usage": _usage(choices, body.n),
    }


@router.post("/v1/chat/completions")
async def chat_completions(http: HTTPRequest):
    state = http.app.state
    body = await _read_body(http, ChatRequest)
    if body is None:
        return Response(status_code=499)
    _check_model(body.model, state.model_id)
    for name, (what, neutral) in CHAT_UNSUPPORTED.items():
        if getattr(body, name) not in neutral:
            raise ApiError(400, f"{name} is not supported by this server ({what}); leave it out", name)
    include_usage = _include_usage(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true; set logprobs or leave top_logprobs out", "top_logprobs")
    limit_name, limit = _chat_limit(body)
    try:
        ids = state.chat.encode(check_messages(body.messages))
    except FieldError as e:
        raise ApiError(400, str(e), e.field) from None
    engine = state.engine
    if limit is None and len(ids) >= engine.max_len:
        raise ApiError(
            400,
            f"messages: the conversation is {len(ids)} tokens as this model's prompt, but a slot holds "
            f"{engine.max_len} (prompt and reply); shorten the messages",
            "messages",
        )
    user_stops = _stops(body.stop)
    choices = [_Choice(ids=ids) for _ in range(body.n)]
    queue: asyncio.Queue = asyncio.Queue()
    requests = _requests(
        choices,
        body,
        state.tokenizer,
        asyncio.get_running_loop(),
        queue,
        max_new=limit if limit is not None else engine.max_len - len(ids),
        stops=user_stops + [s for s in state.chat.stops if s not in user_stops],
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
        logprobs=bool(body.logprobs),
        prompt_logprobs=None,
    )
    names = {**_SAMPLING_NAMES, "max_new_tokens": limit_name, "prompt": "messages"}
    handles = _submit(engine, requests, names)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if body.stream else "chat.completion",
        "created": int(time.time()),
        "model": state.model_id,
        "system_fingerprint": None,
    }
    if body.stream:
        return _streaming(_chat_events(queue, choices, body, base, state.tokenizer, include_usage), handles)
    try:
        async for index, update in _each_update(queue, choices, http):
            c = choices[index]
            c.text += update.text
            if body.logprobs:
                c.logprobs = (c.logprobs or []) + _chat_logprobs(update, state.tokenizer)
    except _ClientGone:
        _cancel(handles)
        return JSONResponse(status_code=499, content={})
    except BaseException:
        _cancel(handles)
        raise
    return {
        **base,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": {"content": c.logprobs or [], "refusal": None} if body.logprobs else None,
                "finish_reason": c.finish,
            }
            for i, c in enumerate(choices)
        ],
        "usage": _usage(choices, body.n),
    }


async def _read_body(http: HTTPRequest, body_model):
    """The body as a ``body_model`` (JSON whatever the Content-Type says: curl -d sends a form type), None
    when the client hung up first; an ApiError for a body too large or not a valid request."""
    size = http.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise ApiError(413, f"the request body has {int(size):,} bytes; the limit is {MAX_BODY:,}")
    try:
        raw = await http.body()
    except ClientDisconnect:
        return None
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the request body has {len(raw):,} bytes; the limit is {MAX_BODY:,}")
    try:
        return body_model.model_validate_json(raw)
    except ValidationError as e:
        raise ApiError(400, *_validation_message(e.errors(), body_model)) from None


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise ApiError(
            404, f"model {name!r} is not served here; this server serves {served!r}", "model", "not_found_error"
        )


def _include_usage(body) -> bool:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true; leave it out", "stream_options")
    return body.stream_options is not None and body.stream_options.include_usage


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for s in stops:
        if not s:
            raise ApiError(400, "stop: an empty stop string; give non-empty strings", "stop")
    return stops


def _chat_limit(body) -> tuple[str, int | None]:
    """The reply's token budget and the field it came from: ``max_completion_tokens`` or its deprecated name
    ``max_tokens`` (both only if equal); (name, None) when neither is given (the reply may fill the slot)."""
    new, old = body.max_completion_tokens, body.max_tokens
    if new is not None and old is not None and new != old:
        raise ApiError(
            400,
            f"max_tokens={old} and max_completion_tokens={new} disagree; send max_completion_tokens alone "
            "(max_tokens is its deprecated name)",
            "max_tokens",
        )
    if new is None and old is not None:
        return "max_tokens", old
    return "max_completion_tokens", new


def _prompts(prompt, tokenizer, vocab_size: int) -> list[tuple[str, str, list[int]]]:
    """(where, text, token ids) per prompt of /v1/completions' ``prompt``: strings are encoded, token ids
    checked against the model's vocabulary and decoded (the text ``echo`` shows)."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        items = [("prompt", prompt)]
    else:
        items = [(f"prompt[{i}]", p) for i, p in enumerate(prompt)]
    out = []
    for where, p in items:
        if isinstance(p, str):
            try:
                ids = tokenizer.encode(p) if p else []
            except ValueError as e:  # text the tokenizer cannot encode (a character-level vocabulary)
                raise ApiError(400, f"{where}: {e}", "prompt") from None
            if not ids:
                raise ApiError(400, f"{where} is empty; give some text to continue", "prompt")
            out.append((where, p, list(ids)))
            continue
        if not p:
            raise ApiError(400, f"{where} is empty; give some token ids to continue", "prompt")
        for j, t in enumerate(p):
            if not 0 <= t < vocab_size:
                raise ApiError(
                    400, f"{where}[{j}]: token id {t} is outside the model's vocabulary [0, {vocab_size})", "prompt"
                )
        out.append((where, tokenizer.decode(p), list(p)))
    return out


def _requests(
    choices, body, tokenizer, loop, queue, *, max_new, stops, top_logprobs, logprobs, prompt_logprobs
) -> list[tuple[Request, Any]]:
    """One engine request per choice (in order; choice i samples with seed + i), each with the callback that
    puts its updates on ``queue`` from the engine's thread. A scoring choice decodes the one token the
    engine must (max_new_tokens >= 1), with no stop strings; the server drops it."""
    seed = secrets.randbits(32) if body.seed is None else body.seed
    eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
    sampling = {f.name: getattr(body, f.http) for f in SAMPLING_FIELDS}
    requests = []
    for index, c in enumerate(choices):
        req = Request(
            prompt=c.ids,
            max_new_tokens=1 if c.score_only else max_new,
            **sampling,
            seed=seed + index,
            eos_ids=eos,
            stop=[] if c.score_only else stops,
            top_logprobs=0 if c.score_only else top_logprobs,
            logprobs=logprobs and not c.score_only,
            prompt_logprobs=prompt_logprobs,
        )

        def on_update(update: Update, index=index):
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, (index, update))

        requests.append((req, on_update))
    return requests


def _submit(engine: Engine, requests, names: dict[str, str]) -> list:
    """Queue every choice, all or none: the handles, or an ApiError (400 bad request, 429 queue full, 503
    closing). ``names``: our field names -> the route's, for the 400's ``param`` and message."""
    try:
        return engine.submit_all(requests)
    except FieldError as e:  # the engine's check names the field (top_k beyond the vocabulary, a prompt too long)
        message = str(e).replace("max_new_tokens", names.get("max_new_tokens", "max_tokens"))
        raise ApiError(400, message, names.get(e.field, e.field)) from None
    except ValueError as e:  # any other refusal of the request: still the client's, without a param
        raise ApiError(400, str(e).replace("max_new_tokens", names.get("max_new_tokens", "max_tokens")), None) from None
    except QueueFull as e:
        if e.never:  # more completions than the server can ever hold at once
            raise ApiError(400, f"{e}; lower n or send fewer prompts per request", "n") from None
        raise ApiError(
            429 if not e.closing else 503,
            f"the server cannot take requests now: {e}",
            None,
            "rate_limit_error" if not e.closing else "server_error",
            {"Retry-After": "1"},
        ) from None


def _cancel(handles) -> None:
    for h in handles:
        h.cancel()


class _ClientGone(Exception):
    """A non-streaming client hung up while its choices decoded."""


async def _each_update(queue, choices, http: HTTPRequest | None = None):
    """(choice index, Update) as the engine hands them out, until every choice has finished; each choice's
    ``finish`` and ``completion_tokens`` kept up to date. A choice the engine ended without a finish reason
    of OpenAI's (shutting down, a failed round) raises ApiError (503, 500). With ``http`` (a non-streaming
    request) the client is polled every 0.5 s and ``_ClientGone`` raised when it has hung up."""
    remaining = len(choices)
    checked = time.monotonic()
    while remaining:
        if http is None:
            index, update = await queue.get()
        else:
            try:
                index, update = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                index, update = None, None
            if time.monotonic() - checked >= 0.5:  # a client that hung up frees its slots
                checked = time.monotonic()
                if await http.is_disconnected():
                    raise _ClientGone
            if update is None:
                continue
        if update.finish_reason in FAILURES:
            status, message = FAILURES[update.finish_reason]
            raise ApiError(status, message, None, "server_error")
        c = choices[index]
        if c.score_only:  # the token decoded only because the engine decodes at least one: not shown
            update = dataclasses.replace(
                update,
                tokens=[],
                logprobs=[],
                top_logprobs=None,
                text="",
                completion_tokens=0,
                finish_reason="length" if update.finish_reason else None,
            )
        c.completion_tokens = update.completion_tokens
        if update.finish_reason:
            c.finish = FINISH[update.finish_reason]
            remaining -= 1
        yield index, update


def _usage(choices: list[_Choice], n: int) -> dict:
    """OpenAI's usage: each prompt counted once (not once per each of its n choices)."""
    prompt = sum(len(c.ids) for c in choices[::n])
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _streaming(events, handles) -> StreamingResponse:
    return StreamingResponse(
        _sse(events, handles), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _event(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(events, handles):
    """Server-sent events: each of ``events``' payloads, then ``data: [DONE]``. A choice that fails (the
    server shutting down, a failed round) ends the stream with OpenAI's error event, whose ``code`` is the
    HTTP status a response not yet under way would have had. A client that goes away cancels the generator
    (Starlette), which frees the slots."""
    complete = False
    try:
        async with contextlib.aclosing(events):
            try:
                async for payload in events:
                    yield _event(payload)
                complete = True
            except ApiError as e:
                yield _event({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}})
        yield "data: [DONE]\n\n"
    finally:
        if not complete:  # the client went away, or a choice failed: free the others' slots
            _cancel(handles)


def _shown_alternatives(alts, tokenizer) -> dict[str, float]:
    """A completion's top_logprobs entry: alternatives decoded alone; those that decode alike keep the likelier."""
    shown: dict[str, float] = {}
    for t, lp in alts:  # most likely first
        shown.setdefault(tokenizer.decode([t]), lp)
    return shown


def _logprobs_block(tokens, logprobs, tops, tokenizer, offset: int) -> dict:
    """OpenAI's completion ``logprobs`` object for ``tokens`` whose text starts at ``offset``. Each token is
    shown decoded alone (a byte of a split character shows as U+FFFD, as OpenAI shows ``bytes:``);
    ``text_offset`` adds the tokens' own lengths to ``offset``; ``tops`` (or None): each token's
    alternatives, None for one without."""
    offsets, at = [], offset
    shown = [tokenizer.decode([t]) for t in tokens]
    for s in shown:
        offsets.append(at)
        at += len(s)
    top = None if tops is None else [None if alts is None else _shown_alternatives(alts, tokenizer) for alts in tops]
    return {"tokens": shown, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}


def _completion_logprobs(c: _Choice, update: Update, tokenizer, body) -> dict | None:
    """This update's part of choice ``c``'s completion ``logprobs``: with echo, the prompt's tokens first (on
    the first update; the first token's logprob and alternatives None, as OpenAI's were); then the new
    tokens, whose offsets are exact at the first of each update (the text decoded before it)."""
    block = None
    if body.echo and update.prompt_logprobs is not None:
        tops = update.prompt_top_logprobs if body.logprobs else None
        block = _logprobs_block(c.ids, update.prompt_logprobs, tops, tokenizer, 0)
    if update.tokens:
        at = len(c.echo) + len(tokenizer.decode(c.tokens))  # one decode per update, not per token
        c.tokens.extend(update.tokens)
        block = _merge_logprobs(
            block, _logprobs_block(update.tokens, update.logprobs, update.top_logprobs, tokenizer, at)
        )
    return block


def _merge_logprobs(acc: dict | None, block: dict | None) -> dict | None:
    if acc is None or block is None:
        return acc if block is None else block
    return {k: (acc[k] or []) + (block[k] or []) if block[k] is not None else acc[k] for k in acc}


def _token_bytes(tokenizer, token: int) -> list[int]:
    """The token's bytes (OpenAI's ``bytes``: a client joins them to rebuild characters split across tokens)."""
    own = getattr(tokenizer, "token_bytes", None)
    return list(own(token) if own is not None else tokenizer.decode([token]).encode("utf-8"))


def _chat_logprobs(update: Update, tokenizer) -> list[dict]:
    """This update's entries of a chat choice's ``logprobs.content``: each token, its log-probability, its
    bytes and its ``top_logprobs`` (all asked for, in order: bytes tell alike-decoding ones apart)."""

    def entry(t, lp):
        return {"token": tokenizer.decode([t]), "logprob": lp, "bytes": _token_bytes(tokenizer, t)}

    tops = update.top_logprobs or [[] for _ in update.tokens]
    return [
        {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
        for t, lp, alts in zip(update.tokens, update.logprobs, tops)
    ]


async def _completion_events(queue, choices, body, base, tokenizer, include_usage):
    """``text_completion`` chunks: a choice's echo first (with logprobs: with its first update, which brings
    the prompt's), then a chunk per engine update with new text; the last carries the usage, or with
    ``include_usage`` a chunk of its own does (``choices: []``)."""
    extra = {"usage": None} if include_usage else {}
    echo_logprobs = body.echo and body.logprobs is not None
    if body.echo and not echo_logprobs:
        for i, c in enumerate(choices):
            choice = {"index": i, "text": c.echo, "logprobs": None, "finish_reason": None}
            yield {**base, "choices": [choice], **extra}
    remaining = len(choices)
    async for index, update in _each_update(queue, choices):
        c = choices[index]
        text = (c.echo if echo_logprobs and not c.started else "") + update.text
        c.started = True
        lp = _completion_logprobs(c, update, tokenizer, body) if body.logprobs is not None else None
        finish = c.finish if update.finish_reason else None
        if not text and finish is None and lp is None:
            continue
        chunk = {**base, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}], **extra}
        if finish is not None:
            remaining -= 1
            if not remaining and not include_usage:
                chunk["usage"] = _usage(choices, body.n)
        yield chunk
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(choices, body.n)}


async def _chat_events(queue, choices, body, base, tokenizer, include_usage):
    """``chat.completion.chunk`` objects: each choice's first delta is ``{"role": "assistant", "content": ""}``,
    then one per engine update with new text (and its ``logprobs.content``), then an empty delta with the
    ``finish_reason``; usage as on /v1/completions."""
    extra = {"usage": None} if include_usage else {}

    def chunk(index, delta, logprobs=None, finish=None):
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice], **extra}

    for i in range(len(choices)):
        yield chunk(i, {"role": "assistant", "content": ""})
    remaining = len(choices)
    async for index, update in _each_update(queue, choices):
        lp = (
            {"content": _chat_logprobs(update, tokenizer), "refusal": None} if body.logprobs and update.tokens else None
        )
        if update.text or lp is not None:
            yield chunk(index, {"content": update.text}, lp)
        if update.finish_reason:
            remaining -= 1
            last = chunk(index, {}, None, choices[index].finish)
            if not remaining and not include_usage:
                last["usage"] = _usage(choices, body.n)
            yield last
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(choices, body.n)}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) (port 0: a free one), or a one-line ValueError naming the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if isinstance(e, socket.gaierror):
            raise ValueError(
                f"host {host!r} is not an address of this machine ({e.strerror}); use e.g. --host "
                "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
            ) from None
        why = (
            "is in use; pick another --port (0: any free one)"
            if e.errno == errno.EADDRINUSE
            else f"cannot be used ({e.strerror}); pick another --host or --port (0: any free one)"
        )
        raise ValueError(f"{host}:{port} {why}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server:
    """uvicorn serving ``app`` on ``sock``; ``run()`` blocks, or ``start()`` in a thread and ``stop()`` (tests,
    bench). ``on_exit`` runs when a signal asks uvicorn to stop, before it waits for open connections:
    the engine's ``close`` there ends every request in flight, so their streams end properly.
    ``on_started`` runs once uvicorn serves, its signal handlers in place: a SIGINT or SIGTERM from then
    on stops it gracefully (one that came between the engine's start and uvicorn's handlers once left
    the process running)."""

    def __init__(self, app: FastAPI, sock: socket.socket, on_exit=None, on_started=None):
        import uvicorn

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if on_exit is not None:
                    on_exit()
                super().handle_exit(sig, frame)

            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started and not self.should_exit and on_started is not None:
                    on_started()

        self.sock = sock
        self._server = _Uvicorn(
            uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, timeout_graceful_shutdown=5)
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def run(self) -> None:
        self._server.run(sockets=[self.sock])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="arjax-http", daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(engine: Engine, tokenizer, model_id: str, sock: socket.socket, *, on_ready=None) -> None:
    """Serve ``engine`` (warmed up) as ``model_id`` on ``sock`` (``bind``) until SIGINT or SIGTERM; in the main
    thread. Starts the engine's thread, runs uvicorn, calls ``on_ready(server)`` (its ``url``) once uvicorn
    serves and handles signals, and stops the engine on the way out, however it ends. A signal returns
    normally, whenever it comes."""
    ready = None if on_ready is None else (lambda: on_ready(server))
    server = Server(create_app(engine, tokenizer, model_id), sock, on_exit=engine.close, on_started=ready)
    # uvicorn stops on SIGINT and SIGTERM, then raises the signal again under the handler it found:
    # this one, so that SIGTERM also ends here (engine stopped, the caller's summary printed, exit 0).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        engine.start()
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()
