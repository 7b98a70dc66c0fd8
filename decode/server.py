"""An OpenAI-compatible HTTP front for the engine (FastAPI + uvicorn): /v1/completions, /v1/models, /health.

The engine's thread owns the device; request handlers only submit requests and wait on an
asyncio queue that the engine's callback fills (``call_soon_threadsafe``), so nothing on the
network ever blocks the decode loop. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (naming the field and
its range), 404 for another model name, 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from arjax.decode.engine import TOP_LOGPROBS, Engine, QueueFull, Request, Update

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``: OpenAI's fields we honour, plus top_k, min_p, repetition_penalty.

    Unknown fields are refused (a misspelt ``temprature`` must not be ignored silently); numbers are
    strict (no ``"0.5"`` strings).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, lt=2**31)] = 16
    temperature: Annotated[float, Field(ge=0, le=1e4)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0, lt=2**31)] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=1e4)] = 1.0
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stream: bool = False
    stream_options: dict | None = None
    logprobs: Annotated[int, Field(ge=0, le=TOP_LOGPROBS)] | None = None
    echo: bool = False
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    user: str | None = None
    # OpenAI fields we do not implement: accepted only at their neutral values.
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    best_of: Literal[1] | None = None
    logit_bias: Annotated[dict, Field(max_length=0)] | None = None
    suffix: Literal[""] | None = None


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field, what it must be and what it got."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({err.get('msg', '')}); send a JSON object", None
    if err.get("type") == "extra_forbidden":
        return (f"unknown field {field!r}; /v1/completions takes {', '.join(CompletionRequest.model_fields)}",
                field)
    if err.get("type") == "literal_error" and loc and loc[0] in ("presence_penalty", "frequency_penalty", "best_of",
                                                                   "suffix"):
        return f"{loc[0]} is not supported by this server; leave it out (repetition_penalty is)", loc[0]
    got = err.get("input")
    shown = f" (got {json.dumps(got)[:80]})" if got is not None and not isinstance(got, dict) else ""
    return f"{field}: {err.get('msg', 'invalid')}{shown}", field


def create_app(engine: Engine, tokenizer, model_id: str) -> FastAPI:
    """The FastAPI app serving ``engine`` (already warmed up and started) under the name ``model_id``."""
    app = FastAPI(title="arjax", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "slots": engine.num_slots, "active": engine.active,
                "waiting": engine.waiting, "max_len": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "arjax"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        if body.model != model_id:
            return _error(404, f"model {body.model!r} is not served here; this server serves {model_id!r}", "model",
                          "not_found_error")
        if body.echo and body.logprobs is not None:
            return _error(400, "echo with logprobs (the prompt's log-probabilities) is not supported; drop one", "echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        for s in stops:
            if not s:
                return _error(400, "stop: an empty stop string; give non-empty strings", "stop")
        seed = secrets.randbits(32) if body.seed is None else body.seed
        eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handles, choices = [], []
        for p_index, text in enumerate(prompts):
            where = "prompt" if isinstance(body.prompt, str) else f"prompt[{p_index}]"
            try:
                ids = tokenizer.encode(text) if text else []
            except ValueError as e:  # text the tokenizer cannot encode (a character-level vocabulary)
                _cancel(handles)
                return _error(400, f"{where}: {e}", "prompt")
            if not ids:
                _cancel(handles)
                return _error(400, f"{where} is empty; give some text to continue", "prompt")
            for j in range(body.n):
                index = len(choices)
                choices.append({"prompt": text, "ids": ids})
                req = Request(prompt=ids, max_new_tokens=body.max_tokens, temperature=body.temperature,
                              top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                              repetition_penalty=body.repetition_penalty, seed=seed + j, eos_ids=eos, stop=stops,
                              top_logprobs=body.logprobs or 0)

                def on_update(update: Update, index=index):
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, (index, update))
                    except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                        pass

                try:
                    handles.append(engine.submit(req, on_update))
                except ValueError as e:
                    _cancel(handles)
                    message = str(e).replace("max_new_tokens", "max_tokens")
                    param = next((f for f in ("max_tokens", "temperature", "top_k", "top_p", "min_p",
                                              "repetition_penalty", "seed") if f in message), "prompt")
                    return _error(400, message if param != "prompt" else f"{where}: {message}", param)
                except QueueFull as e:
                    _cancel(handles)
                    return _error(429, f"the server is busy: {e}", None, "rate_limit_error")
        rid = f"cmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id}
        if body.stream:
            return StreamingResponse(_sse(queue, handles, choices, body, base, tokenizer),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(queue, handles, choices, body, base, tokenizer, http)

    return app


def _cancel(handles) -> None:
    for h in handles:
        h.cancel()


def _logprobs_block(update: Update, tokenizer, offset: int) -> dict:
    """OpenAI's completion ``logprobs`` object for these tokens; ``offset``: text offset of the first one."""
    words = [tokenizer.decode([t]) for t in update.tokens]
    offsets, at = [], offset
    for w in words:
        offsets.append(at)
        at += len(w)
    top = None
    if update.top_logprobs is not None:
        top = [{tokenizer.decode([t]): lp for t, lp in alts} for alts in update.top_logprobs]
    return {"tokens": words, "token_logprobs": update.logprobs, "top_logprobs": top, "text_offset": offsets}


def _merge_logprobs(acc: dict | None, block: dict) -> dict:
    if acc is None:
        return block
    return {k: (acc[k] or []) + (block[k] or []) if block[k] is not None else acc[k] for k in acc}


async def _collect(queue, handles, choices, body, base, tokenizer, http) -> dict:
    """Wait for every choice to finish (cancelling all if the client goes away); one response."""
    texts = [c["prompt"] if body.echo else "" for c in choices]
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
                logprobs[index] = _merge_logprobs(logprobs[index], _logprobs_block(update, tokenizer, len(texts[index])))
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
    prompt_tokens = sum(len(c["ids"]) for c in choices[:: body.n])
    return {**base, "choices": [{"index": i, "text": texts[i], "logprobs": logprobs[i], "finish_reason": finish[i]}
                                for i in range(len(choices))],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(usage),
                      "total_tokens": prompt_tokens + sum(usage)}}


async def _sse(queue, handles, choices, body, base, tokenizer):
    """Server-sent events: a ``text_completion`` chunk per choice per engine chunk with new text; the last
    choice to finish carries ``finish_reason`` and the request's usage; then ``data: [DONE]``. A client that
    goes away cancels the generator (Starlette), which frees the slots."""
    def event(payload) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    remaining = len(choices)
    shown = [0] * len(choices)
    usage = [0] * len(choices)
    try:
        if body.echo:
            for i, c in enumerate(choices):
                yield event({**base, "choices": [{"index": i, "text": c["prompt"], "logprobs": None, "finish_reason": None}]})
        while remaining:
            index, update = await queue.get()
            usage[index] = update.completion_tokens
            finish = FINISH[update.finish_reason] if update.finish_reason else None
            if not update.text and finish is None and not (body.logprobs is not None and update.tokens):
                continue
            lp = _logprobs_block(update, tokenizer, shown[index]) if body.logprobs is not None and update.tokens else None
            shown[index] += len(update.text)
            chunk = {**base, "choices": [{"index": index, "text": update.text, "logprobs": lp, "finish_reason": finish}]}
            if finish is not None:
                remaining -= 1
                if not remaining:
                    prompt_tokens = sum(len(c["ids"]) for c in choices[:: body.n])
                    chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(usage),
                                      "total_tokens": prompt_tokens + sum(usage)}
            yield event(chunk)
        yield "data: [DONE]\n\n"
    finally:
        if remaining:  # the client went away (or the server stops): free the slots
            _cancel(handles)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) (port 0: a free one), or a one-line OSError naming the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is in use" if e.errno in (98, 48) else f"cannot be bound ({e.strerror})"
        raise OSError(f"{host}:{port} {why}; pick another --port (0: any free one) or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server:
    """uvicorn serving ``app`` on ``sock``; ``run()`` blocks, or ``start()`` in a thread and ``stop()`` (tests, bench)."""

    def __init__(self, app: FastAPI, sock: socket.socket):
        import uvicorn

        self.sock = sock
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, log_config=None,
                                                     timeout_graceful_shutdown=1))
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
