"""An OpenAI-compatible HTTP front for the engine (FastAPI + uvicorn): /v1/completions, /v1/models, /health.

The engine's thread owns the device; request handlers only submit requests and wait on an
asyncio queue that the engine's callback fills (``call_soon_threadsafe``), so nothing on the
network ever blocks the decode loop. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (naming the field and
its range: a sampling field's refusal is ``check_sampling_field``'s line, as from Python, a flag or a
batch line), 404 for another model name, 429 when the queue is full.

``create_app`` wires the module-level handlers to an engine (``app.state``); ``bind`` takes the
socket (before the model loads, so a taken port fails at once); ``serve`` runs it all until a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from arjax.decode.engine import TOP_LOGPROBS, Engine, QueueFull, Request, Update
from arjax.decode.sampling import SAMPLING_FIELDS, FieldError, SamplingField, check_sampling_field

MAX_BODY = 16 << 20  # bytes of one request body: far beyond any prompt a slot can hold
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}
# Our field names -> the body's (OpenAI's), where they differ: what a 400's ``param`` names.
HTTP_NAMES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs", **{f.name: f.http for f in SAMPLING_FIELDS}}


def _sampling_field(f: SamplingField):
    """A body field for one sampling field: checked by ``check_sampling_field`` itself, so a value is refused
    with the same line as from Python, a flag or a batch line (types included)."""
    return Annotated[
        Any, AfterValidator(lambda value: check_sampling_field(f.name, value)), Field(description=f.help)
    ], f.default


CompletionRequest = create_model(
    "CompletionRequest",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="The body of ``POST /v1/completions``: OpenAI's fields we honour, plus top_k, min_p and "
    "repetition_penalty. Unknown fields are refused (a misspelt ``temprature`` must not be ignored "
    'silently); numbers are strict (no ``"0.5"`` strings).',
    __module__=__name__,
    model=(str, ...),
    prompt=(str | Annotated[list[str], Field(min_length=1)], ...),
    max_tokens=(Annotated[int, Field(ge=1, lt=2**31)], 16),
    **{f.http: _sampling_field(f) for f in SAMPLING_FIELDS},
    n=(Annotated[int, Field(ge=1, le=64)], 1),
    stream=(bool, False),
    stream_options=(dict | None, None),
    logprobs=(Annotated[int, Field(ge=0, le=TOP_LOGPROBS)] | None, None),
    echo=(bool, False),
    stop=(str | Annotated[list[str], Field(max_length=16)] | None, None),
    seed=(int | None, None),
    user=(str | None, None),
    # OpenAI fields we do not implement: accepted only at their neutral values.
    presence_penalty=(Literal[0, 0.0], 0.0),
    frequency_penalty=(Literal[0, 0.0], 0.0),
    best_of=(Literal[1] | None, None),
    logit_bias=(Annotated[dict, Field(max_length=0)] | None, None),
    suffix=(Literal[""] | None, None),
)


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
    "prompt": "a string or a non-empty list of strings",
    "stop": "a string or a list of at most 16 strings",
}


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line naming the first bad field, what it must be and what it got (pydantic's ``errors()``)."""
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({first.get('msg', '')}); send a JSON object", None
    if not first.get("loc"):
        return 'the request body must be a JSON object, e.g. {"model": ..., "prompt": "..."}', None
    field = str(first["loc"][0])
    refusal = (first.get("ctx") or {}).get("error")
    if isinstance(refusal, FieldError):  # a sampling field: check_sampling_field's own line
        return str(refusal), field
    if kind == "extra_forbidden":
        return f"unknown field {field!r}; /v1/completions takes {', '.join(CompletionRequest.model_fields)}", field
    if kind == "literal_error" and field in ("presence_penalty", "frequency_penalty", "best_of", "suffix"):
        return f"{field} is not supported by this server; leave it out (repetition_penalty is)", field
    same = [e for e in errors if e.get("loc") and str(e["loc"][0]) == field]
    if field in _UNION_FIELDS:
        # One error per branch of the union: the one that is not a plain type mismatch says most.
        useful = [e for e in same if not str(e.get("type", "")).endswith("_type")]
        if not useful:
            return f"{field} must be {_UNION_FIELDS[field]}{_got(first)}", field
        first = useful[0]
    where = field + "".join(f"[{p}]" for p in first["loc"][1:] if isinstance(p, int))
    return f"{where}: {first.get('msg', 'invalid')}{_got(first)}", field


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
    The handlers are this module's functions; they find the engine, tokenizer and name in ``app.state``."""
    app = FastAPI(title="arjax", docs_url=None, redoc_url=None)
    app.state.engine, app.state.tokenizer, app.state.model_id = engine, tokenizer, model_id
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
        f"{exc.detail}; this server has POST /v1/completions, GET /v1/models, GET /health",
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
    }


@router.get("/v1/models")
async def models(http: HTTPRequest):
    state = http.app.state
    return {
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": state.created, "owned_by": "arjax"}],
    }


@router.post("/v1/completions")
async def completions(http: HTTPRequest):
    state = http.app.state
    body = await _read_body(http)
    if body is None:  # the client hung up before its body arrived: nobody to answer, nothing to log
        return Response(status_code=499)
    if body.model != state.model_id:
        raise ApiError(
            404,
            f"model {body.model!r} is not served here; this server serves {state.model_id!r}",
            "model",
            "not_found_error",
        )
    if body.echo and body.logprobs is not None:
        raise ApiError(400, "echo with logprobs (the prompt's log-probabilities) is not supported; drop one", "echo")
    queue: asyncio.Queue = asyncio.Queue()
    choices, requests = _choices(body, state.tokenizer, asyncio.get_running_loop(), queue)
    handles = _submit(state.engine, requests)
    base = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_id,
    }
    if body.stream:
        return StreamingResponse(
            _sse(queue, handles, choices, body, base, state.tokenizer),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return await _collect(queue, handles, choices, body, base, state.tokenizer, http)


async def _read_body(http: HTTPRequest):
    """The body as a CompletionRequest (JSON whatever the Content-Type says: curl -d sends a form type), None
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
        return CompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise ApiError(400, *_validation_message(e.errors())) from None


def _choices(body, tokenizer, loop, queue) -> tuple[list[dict], list[tuple[Request, Any]]]:
    """One engine request per choice (prompts x n, in order; choice i samples with seed + i), each with the
    callback that puts its updates on ``queue`` from the engine's thread."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    for s in stops:
        if not s:
            raise ApiError(400, "stop: an empty stop string; give non-empty strings", "stop")
    seed = secrets.randbits(32) if body.seed is None else body.seed
    eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
    sampling = {f.name: getattr(body, f.http) for f in SAMPLING_FIELDS}
    choices, requests = [], []
    for p_index, text in enumerate(prompts):
        where = "prompt" if isinstance(body.prompt, str) else f"prompt[{p_index}]"
        try:
            ids = tokenizer.encode(text) if text else []
        except ValueError as e:  # text the tokenizer cannot encode (a character-level vocabulary)
            raise ApiError(400, f"{where}: {e}", "prompt") from None
        if not ids:
            raise ApiError(400, f"{where} is empty; give some text to continue", "prompt")
        for _ in range(body.n):
            index = len(choices)
            choices.append({"prompt": text, "ids": ids})
            req = Request(
                prompt=ids,
                max_new_tokens=body.max_tokens,
                **sampling,
                seed=seed + index,
                eos_ids=eos,
                stop=stops,
                top_logprobs=body.logprobs or 0,
            )

            def on_update(update: Update, index=index):
                with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                    loop.call_soon_threadsafe(queue.put_nowait, (index, update))

            requests.append((req, on_update))
    return choices, requests


def _submit(engine: Engine, requests) -> list:
    """Queue every choice, all or none: the handles, or an ApiError (400 bad request, 429 queue full, 503 closing)."""
    try:
        return engine.submit_all(requests)
    except FieldError as e:  # the engine's check names the field (top_k beyond the vocabulary, a prompt too long)
        raise ApiError(400, str(e).replace("max_new_tokens", "max_tokens"), HTTP_NAMES.get(e.field, e.field)) from None
    except ValueError as e:  # any other refusal of the request: still the client's, without a param
        raise ApiError(400, str(e).replace("max_new_tokens", "max_tokens"), None) from None
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


def _logprobs_block(update: Update, tokenizer, before: list[int], offset: int) -> dict:
    """OpenAI's completion ``logprobs`` object for this update's tokens. ``before``: the choice's tokens
    so far (extended here); ``offset``: where the choice's text starts (the prompt's length with echo).
    Each token is shown decoded alone (a byte of a split character shows as U+FFFD, as OpenAI shows
    ``bytes:``); ``text_offset`` is exact at the first token of each update (the text decoded before it)
    and adds the tokens' own lengths after that; alternatives that
    decode to the same string keep the likelier one (so there may be fewer than asked for)."""
    offsets, at = [], offset + len(tokenizer.decode(before))  # one decode per update, not per token
    for t in update.tokens:
        offsets.append(at)
        at += len(tokenizer.decode([t]))
    before.extend(update.tokens)
    top = None
    if update.top_logprobs is not None:
        top = []
        for alts in update.top_logprobs:
            shown: dict[str, float] = {}
            for t, lp in alts:  # most likely first
                shown.setdefault(tokenizer.decode([t]), lp)
            top.append(shown)
    return {
        "tokens": [tokenizer.decode([t]) for t in update.tokens],
        "token_logprobs": update.logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _merge_logprobs(acc: dict | None, block: dict) -> dict:
    if acc is None:
        return block
    return {k: (acc[k] or []) + (block[k] or []) if block[k] is not None else acc[k] for k in acc}


async def _collect(queue, handles, choices, body, base, tokenizer, http) -> dict:
    """Wait for every choice to finish (cancelling all if the client goes away); one response."""
    texts = [c["prompt"] if body.echo else "" for c in choices]
    ids = [[] for _ in choices]
    logprobs: list[dict | None] = [None] * len(choices)
    finish: list[str | None] = [None] * len(choices)
    usage = [0] * len(choices)
    checked = time.monotonic()
    try:
        while any(f is None for f in finish):
            try:
                index, update = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                index, update = None, None
            if time.monotonic() - checked >= 0.5:  # a client that hung up frees its slots
                checked = time.monotonic()
                if await http.is_disconnected():
                    _cancel(handles)
                    return JSONResponse(status_code=499, content={})
            if update is None:
                continue
            if body.logprobs is not None and update.tokens:
                logprobs[index] = _merge_logprobs(logprobs[index], _logprobs_block(update, tokenizer, ids[index], 0))
            texts[index] += update.text
            usage[index] = update.completion_tokens
            if update.finish_reason:
                finish[index] = FINISH[update.finish_reason]
    except asyncio.CancelledError:
        _cancel(handles)
        raise
    if "error" in finish:
        _cancel(handles)
        return _error(500, "decoding failed on the server (its log says why); retry", None, "server_error")
    if "cancelled" in finish:  # the server is shutting down
        return _error(503, "the server is shutting down; retry on another", None, "server_error")
    prompt_tokens = sum(len(c["ids"]) for c in choices[:: body.n])
    return {
        **base,
        "choices": [
            {"index": i, "text": texts[i], "logprobs": logprobs[i], "finish_reason": finish[i]}
            for i in range(len(choices))
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(usage),
            "total_tokens": prompt_tokens + sum(usage),
        },
    }


async def _sse(queue, handles, choices, body, base, tokenizer):
    """Server-sent events: a ``text_completion`` chunk per choice per engine chunk with new text; the last
    choice to finish carries ``finish_reason`` and the request's usage; then ``data: [DONE]``. A client that
    goes away cancels the generator (Starlette), which frees the slots."""

    def event(payload) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    remaining = len(choices)
    ids = [[] for _ in choices]
    usage = [0] * len(choices)
    try:
        if body.echo:
            for i, c in enumerate(choices):
                choice = {"index": i, "text": c["prompt"], "logprobs": None, "finish_reason": None}
                yield event({**base, "choices": [choice]})
        while remaining:
            index, update = await queue.get()
            usage[index] = update.completion_tokens
            finish = FINISH[update.finish_reason] if update.finish_reason else None
            if not update.text and finish is None and not (body.logprobs is not None and update.tokens):
                continue
            lp = None
            if body.logprobs is not None and update.tokens:
                lp = _logprobs_block(update, tokenizer, ids[index], 0)
            chunk = {
                **base,
                "choices": [{"index": index, "text": update.text, "logprobs": lp, "finish_reason": finish}],
            }
            if finish is not None:
                remaining -= 1
                if not remaining:
                    prompt_tokens = sum(len(c["ids"]) for c in choices[:: body.n])
                    chunk["usage"] = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": sum(usage),
                        "total_tokens": prompt_tokens + sum(usage),
                    }
            yield event(chunk)
        yield "data: [DONE]\n\n"
    finally:
        if remaining:  # the client went away (or the server stops): free the slots
            _cancel(handles)


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
    the engine's ``close`` there ends every request in flight, so their streams end properly."""

    def __init__(self, app: FastAPI, sock: socket.socket, on_exit=None):
        import uvicorn

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if on_exit is not None:
                    on_exit()
                super().handle_exit(sig, frame)

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
    thread. Starts the engine's thread, calls ``on_ready(server)`` (its ``url``), runs uvicorn, and stops the
    engine on the way out, however it ends. A signal returns normally."""
    server = Server(create_app(engine, tokenizer, model_id), sock, on_exit=engine.close)
    engine.start()
    if on_ready is not None:
        on_ready(server)
    # uvicorn stops on SIGINT and SIGTERM, then raises the signal again under the handler it found:
    # this one, so that SIGTERM also ends here (engine stopped, the caller's summary printed, exit 0).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()
