"""The FastAPI app factory: OpenAI-compatible endpoints, auth, errors, SSE streaming, metrics and the playground.

    app = create_app(llm, ServerConfig(...))      # uvicorn.run(app) starts the engine loop through the lifespan

`create_app` builds one `ServerState` (engine loop, metrics, prompt encoder, config), keeps it in `app.state.server`
and mounts `router`, whose handlers are plain module-level functions that read it from the request.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream: true` SSE ending in
`data: [DONE]`), GET /health, GET /metrics (Prometheus text), GET / (the playground page), GET /openapi.json (and
/docs, /redoc without --api-key; see schema.py). Every request passes the Host check and POST bodies must be JSON
(security.py); prompts are checked and tokenised off the GIL (prompts.py).

Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`: 400 invalid or unsupported
fields, too-long prompts and unknown Host names, 401 bad API key, 404 unknown model or route, 413 oversized body,
415 a body not declared JSON, 422 a constraint that could not be met mid-generation (below), 503 queue full (with
Retry-After), 500 engine failure. A client that disconnects
cancels its request: streaming responses are cancelled by Starlette (the generator's `finally` aborts), non-streaming
ones watch `http.disconnect` themselves.

A request that fails mid-generation ends alone (`RequestOutput.error`, finish_reason "error"; its batch mates go on):
non-streaming, it is answered with the error instead of a completion; streaming, the text already sent stays and
an error event `data: {"error": {...}}` then `data: [DONE]` end the stream. Its constraint hitting a dead end (the
matcher allows no token, a template's pinned token is refused) is 422 `invalid_request_error`, code
`constraint_unsatisfiable`, `param` the constraint's field: the request was valid when admitted, but cannot be
completed as given, and retrying it unchanged fails the same way (so not a 5xx, which clients retry). Anything else
(a bug) is 500 `server_error`, code `generation_failed`; a failure of the whole engine step fails every request in
flight with 500 and the server goes on serving.

Opt-in draft streaming: with `"dgemma": {"drafts": true}` and `stream: true`, every denoising step also sends a
chunk with `"object": "dgemma.draft"`, `"choices": []` (so OpenAI clients, which must already skip the empty-choices
usage chunk, ignore it) and `"dgemma": {canvas, step, token_ids, tokens, accepted, mean_entropy}`; a constrained
request's drafts add `pinned` (positions a template pins) and `allowed` (tokens the constraint allowed per position;
1 = forced) and `vocab_size`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import ServerConfig, media  # [vision] media: image parts
from .async_engine import AsyncEngine, EngineUnavailableError, QueueFullError
from .metrics import ServerMetrics
from .prompts import PromptEncoder
from .protocol import (ChatChoice, ChatCompletionRequest, CompletionChoice, CompletionRequest, ModelCard, ModelList,
                       RequestError, Response, StreamWriter, Usage, completion_prompt, constraint_fields, error_body,
                       sampling_params, template_messages, unsupported)
from .schema import ERROR, Health, add_request_bodies, route_docs
from .security import HostCheck, require_json

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors(include_url=False)[0]
    # Union members show up in `loc` as type names ("str", "list[int]"): drop them, keep the field path.
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float")))]
    param = ".".join(loc) or None
    msg = err["msg"] if err["type"] != "extra_forbidden" else "unknown field (not an OpenAI or dgemma parameter)"
    return (f"{param}: {msg}" if param else msg), param


@dataclass
class ServerState:
    """What the handlers share, reached as `request.app.state.server`."""

    llm: Any
    config: ServerConfig
    metrics: ServerMetrics
    engine: AsyncEngine
    prompts: PromptEncoder
    names: set[str]  # model names clients may send
    max_len: int
    vocab: int
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.piece = functools.lru_cache(maxsize=65536)(self._piece)  # token id -> text, for draft events

    def _piece(self, token_id: int) -> str:
        tok = self.llm.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok else str(token_id)


def create_app(llm, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics(llm.engine.cfg.max_num_seqs, config.max_waiting)
    st = ServerState(llm, config, metrics, AsyncEngine(llm.engine, metrics, config.max_waiting),
                     PromptEncoder(llm.tokenizer, llm.engine.cfg.max_model_len),
                     set(config.served_model_names) | {config.model_name}, llm.engine.cfg.max_model_len,
                     llm.engine.V)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.engine.start()
        yield
        st.engine.shutdown()
        if hasattr(llm, "close"):
            llm.close()  # [parallel] stops the other tensor-parallel ranks

    # With --api-key the interactive docs are off and the schema needs the key (GET /openapi.json below).
    keyless = config.api_key is None
    app = FastAPI(title="dgemma", summary="OpenAI-compatible block-diffusion server", lifespan=lifespan,
                  docs_url="/docs" if keyless else None, redoc_url="/redoc" if keyless else None,
                  openapi_url="/openapi.json" if keyless else None)
    app.state.server = st
    add_request_bodies(app)
    app.add_middleware(HostCheck, bound_host=config.host, allowed=config.allowed_hosts)
    for kind, handler in ((RequestError, _request_error), (RequestValidationError, _fastapi_validation),
                          (StarletteHTTPException, _http_error)):
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    if not keyless:
        app.add_api_route("/openapi.json", _openapi_with_key, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.server


# MARK: errors


def error_response(st: ServerState, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    with st.metrics.lock:
        st.metrics.errors.inc(code=str(status))
    return JSONResponse(body, status_code=status, headers=headers)


async def _request_error(request: Request, e: RequestError):
    return error_response(_state(request), e.status, error_body(e.message, e.type, e.param, e.code), e.headers)


async def _fastapi_validation(request: Request, e: RequestValidationError):
    return error_response(_state(request), 400, error_body(str(e.errors()[0].get("msg")), param=None))


async def _http_error(request: Request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(_state(request), e.status_code, error_body(str(e.detail), kind, None, e.status_code),
                          e.headers)


# MARK: reading a request


def authorize(st: ServerState, request: Request) -> None:
    if st.config.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if not auth:
        raise RequestError("missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           status=401, headers={"WWW-Authenticate": "Bearer"})
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), st.config.api_key.encode()):
        raise RequestError("incorrect API key provided", code="invalid_api_key", status=401,
                           headers={"WWW-Authenticate": "Bearer"})


async def read_body(st: ServerState, request: Request) -> bytes:
    limit = st.config.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = RequestError(f"request body exceeds {limit} bytes", code="request_too_large", status=413)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a lying Content-Length cannot get past
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(st: ServerState, request: Request, model: type, endpoint: str):
    authorize(st, request)
    with st.metrics.lock:
        st.metrics.received.inc(endpoint=endpoint)
    require_json(request.headers.get("content-type"))
    body = await read_body(st, request)
    try:
        req = model.model_validate_json(body or b"null")
    except ValidationError as e:
        message, param = _validation_message(e)
        if e.errors()[0]["type"] == "json_invalid":
            message, param = "request body is not valid JSON", None
        raise RequestError(message, param=param) from None
    if req.model is not None and req.model not in st.names:
        raise RequestError(f"the model '{req.model}' does not exist; this server serves {sorted(st.names)}",
                           param="model", code="model_not_found", status=404)
    if (err := unsupported(req)) is not None:
        raise err
    return req


def budget(st: ServerState, n_prompt: int, req) -> int:
    """max_new_tokens for a request: what it asked for, or all the room left (never a silent 256 cap)."""
    chat, max_len = isinstance(req, ChatCompletionRequest), st.max_len
    if n_prompt >= max_len:
        raise st.prompts.too_long(n_prompt, "messages" if chat else "prompt")
    asked = req.requested_max_tokens
    if asked is not None and n_prompt + asked > max_len:
        field = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        raise RequestError(f"this model's maximum context length is {max_len} tokens, but {n_prompt + asked} "
                           f"were requested ({n_prompt} in the prompt, {asked} in the completion); reduce the "
                           f"prompt or {field}", param=field, code="context_length_exceeded")
    return asked if asked is not None else max_len - n_prompt


async def start(st: ServerState, req, prompt_ids: list[int], prefix: str, images=None):
    if any(not 0 <= t < st.vocab for t in prompt_ids):
        raise RequestError(f"prompt token ids must lie in [0, {st.vocab})", param="prompt")
    params = sampling_params(req, budget(st, len(prompt_ids), req))
    eng = st.llm.engine  # the paged KV pool must hold the request whole (docs/kv_cache.md)
    if (need := eng.blocks_needed(len(prompt_ids), params.max_new_tokens)) > eng.pool.num_blocks:
        raise RequestError(f"the request needs {need} KV blocks of {eng.pool.block_size} positions ({len(prompt_ids)}"
                           f" prompt tokens, {params.max_new_tokens} output tokens); the KV pool has "
                           f"{eng.pool.num_blocks}", param="max_tokens", code="context_length_exceeded")
    try:
        params.resolve(st.llm.engine.defaults)  # e.g. t_min above the checkpoint's t_max
    except ValueError as e:
        raise RequestError(str(e), param=str(e).split(" ")[0]) from None
    rid = f"{prefix}-{uuid.uuid4().hex}"
    try:
        q = st.engine.submit(rid, prompt_ids, params, images=images)
    except QueueFullError as e:
        raise RequestError(str(e), type="server_overloaded", code="queue_full", status=503,
                           headers={"Retry-After": str(st.config.retry_after_s)}) from None
    except EngineUnavailableError as e:
        raise RequestError(str(e), type="server_error", code="engine_unavailable", status=503) from None
    return rid, q


# MARK: answering


def extras(out) -> dict:
    return {"steps_per_canvas": out.steps_per_canvas, "tokens_per_forward": round(out.tokens_per_forward, 4)}


def failed(req, failure) -> RequestError:
    """The answer to a request that failed mid-generation (`RequestOutput.error`; the module doc says why 422)."""
    if failure.kind == "constraint":
        return RequestError(failure.message, param=constraint_fields(req)[0], code="constraint_unsatisfiable",
                            status=422)
    return RequestError(failure.message, type="server_error", code="generation_failed", status=500)


def usage(n_prompt: int, out) -> Usage:
    n = len(out.token_ids)
    return Usage(prompt_tokens=n_prompt, completion_tokens=n, total_tokens=n_prompt + n)


def first_token(st: ServerState, t0: float) -> None:
    with st.metrics.lock:
        st.metrics.ttft.observe(time.monotonic() - t0)


def ended(st: ServerState, t0: float) -> None:
    with st.metrics.lock:
        st.metrics.latency.observe(time.monotonic() - t0)


async def respond(st: ServerState, request: Request, req, rid: str, q: asyncio.Queue, n_prompt: int, chat: bool,
                  t0: float):
    model_name = req.model or st.config.model_name
    if req.stream:
        return StreamingResponse(sse(st, req, rid, q, n_prompt, t0, StreamWriter(rid, model_name, chat)),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    out = await wait_final(st, request, rid, q, t0)
    if out.error is not None:
        raise failed(req, out.error)
    if chat:
        choice = ChatChoice(message={"role": "assistant", "content": out.text}, finish_reason=out.finish_reason)
    else:
        choice = CompletionChoice(text=out.text, finish_reason=out.finish_reason)
    return Response(id=rid, object="chat.completion" if chat else "text_completion", created=int(time.time()),
                    model=model_name, choices=[choice], usage=usage(n_prompt, out), dgemma=extras(out)).model_dump()


async def wait_final(st: ServerState, request: Request, rid: str, q: asyncio.Queue, t0: float):
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        first = True
        while True:
            get = asyncio.ensure_future(q.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                st.engine.abort(rid)  # the client went away: free the slot now
                raise RequestError("client disconnected", status=499)
            ev = get.result()
            if ev.kind == "commit" and first and ev.token_ids_delta:
                first = False
                first_token(st, t0)
            elif ev.kind == "error":
                raise RequestError(ev.text_delta, type="server_error", code="engine_failure", status=500)
            elif ev.kind == "finished":
                ended(st, t0)
                return ev.output
    finally:
        gone.cancel()


async def sse(st: ServerState, req, rid: str, q: asyncio.Queue, n_prompt: int, t0: float, w: StreamWriter):
    done, streamed, first, pending = False, "", True, 0
    try:
        if w.chat:
            yield w.role()
        while True:
            ev = await q.get()
            if ev.kind == "draft" and req.drafts:
                d = ev.draft
                info = {"canvas": d.canvas_index, "step": d.step, "token_ids": d.argmax,
                        "tokens": [st.piece(t) for t in d.argmax], "accepted": d.accepted,
                        "mean_entropy": round(d.mean_entropy, 5)}
                if d.allowed is not None:  # [constrained] pinned and masked positions
                    info.update(pinned=d.pinned, allowed=d.allowed, vocab_size=st.vocab)
                yield w.draft(info)
            elif ev.kind == "commit":
                if first and ev.token_ids_delta:
                    first = False
                    first_token(st, t0)
                pending += len(ev.token_ids_delta)
                if ev.text_delta:  # drafts mode also says how many tokens the canvas added (for tokens/s)
                    streamed += ev.text_delta
                    yield w.text(ev.text_delta, {"tokens": pending} if req.drafts else None)
                    pending = 0
            elif ev.kind in ("finished", "error"):
                done = True
                out = ev.output
                if ev.kind == "error" or out.error is not None:  # the text sent so far stays; the error ends it
                    e = (RequestError(ev.text_delta, type="server_error", code="engine_failure", status=500)
                         if ev.kind == "error" else failed(req, out.error))
                    with st.metrics.lock:
                        st.metrics.errors.inc(code=str(e.status))
                    yield w.error(e.message, e.type, e.param, e.code) + w.DONE
                    return
                if out.text.startswith(streamed) and len(out.text) > len(streamed):
                    yield w.text(out.text[len(streamed):])  # bytes the decoder held back until the end
                yield w.finish(out.finish_reason, extras(out))
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield w.usage(usage(n_prompt, out))
                ended(st, t0)
                yield w.DONE
                return
    finally:
        if not done:
            st.engine.abort(rid)  # cancelled by a disconnect (Starlette cancels the generator)


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# MARK: endpoints

router = APIRouter()


# Tokenising runs in a worker thread and releases the GIL (see prompts.py): a multi-megabyte prompt neither freezes
# the event loop (/health, other streams) nor the engine thread. Too long by characters: refused first.
@router.post("/v1/completions", **route_docs(CompletionRequest))
async def completions(request: Request):
    st, t0 = _state(request), time.monotonic()
    req = await parse(st, request, CompletionRequest, "completions")
    prompt = completion_prompt(req)
    if isinstance(prompt, str):
        st.prompts.check_chars(len(prompt), "prompt")
        ids = await asyncio.to_thread(st.prompts.encode, prompt)
    else:
        budget(st, len(prompt), req)  # before copying a long list of ids
        ids = [int(t) for t in prompt]
    rid, q = await start(st, req, ids, "cmpl")
    return await respond(st, request, req, rid, q, len(ids), False, t0)


@router.post("/v1/chat/completions", **route_docs(ChatCompletionRequest))
async def chat_completions(request: Request):
    st, t0 = _state(request), time.monotonic()
    req = await parse(st, request, ChatCompletionRequest, "chat")
    messages = template_messages(req)

    def render_and_encode():  # the template is the client's to satisfy: its errors are 400s
        if media.image_parts(messages):  # [vision] images are decoded and checked here (400s: server/media.py)
            kwargs = st.prompts.template_kwargs(req.chat_template_kwargs)
            ids, images = media.chat_inputs(st.llm, messages, st.config.media or media.MediaPolicy(), **kwargs)
            if len(ids) >= st.max_len:
                raise st.prompts.too_long(len(ids), "messages")
            return ids, images
        text = st.prompts.render_chat(messages, req.chat_template_kwargs)
        return st.prompts.encode(text, "messages", add_special_tokens=False), None

    ids, images = await asyncio.to_thread(render_and_encode)
    rid, q = await start(st, req, ids, "chatcmpl", images)
    return await respond(st, request, req, rid, q, len(ids), True, t0)


@router.get("/v1/models", responses={200: {"model": ModelList}, 401: ERROR})
async def models(request: Request):
    st = _state(request)
    authorize(st, request)
    cards = [ModelCard(id=n, created=st.started, root=str(st.llm.checkpoint.path), max_model_len=st.max_len)
             for n in [st.config.model_name] + [n for n in st.config.served_model_names if n != st.config.model_name]]
    return ModelList(data=cards).model_dump()


@router.get("/health", responses={200: {"model": Health}, 503: ERROR})
async def health(request: Request):
    st = _state(request)
    if not st.engine.alive:
        return error_response(st, 503, error_body("engine loop is not running", "server_error"))
    return {"status": "ok", "running": st.metrics.running.get(), "waiting": st.metrics.queue_depth.get()}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request):
    return PlainTextResponse(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "playground.html", media_type="text/html")


async def _openapi_with_key(request: Request):  # GET /openapi.json under --api-key
    authorize(_state(request), request)
    return request.app.openapi()
