"""The HTTP layer of the generation server (FastAPI): parse, validate, submit, stream.

    app = create_app(service, tokenizer, cfg, ServerConfig(api_key="k"), chat_template=tpl)
    uvicorn.run(app, host="127.0.0.1", port=5000)

Endpoints: ``PUT /api`` (Megatron / EE-LLM), ``POST /v1/completions``, ``POST
/v1/chat/completions`` (SSE when ``stream``), ``GET /v1/models``, ``GET /health``, ``GET
/metrics`` (Prometheus) and ``GET /`` (the page in static/). Handlers never touch the model:
they turn the body into validated GenerationRequests (protocol.py), hand them to the
GenerationService (service.py) and turn the RequestUpdates that come back into responses
(results.py). A client that disconnects, streaming or not, has its requests cancelled (their
rows are freed at the next step); ``request_timeout`` cancels a request that runs too long
(it ends with ``finish_reason: "timeout"``); a full queue answers 429 at once.

Errors are JSON ``{"error": {"message", "type", "param", "code"}}``: 4xx naming the field for
bad input (``guard.py`` adds 401 without the API key and 413 over the body limit), 5xx only for
a genuine server fault, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron.early_exit.inference.requests import QueueFull, RequestError
from megatron.early_exit.server import results
from megatron.early_exit.server.guard import Guard, error_body
from megatron.early_exit.server.metrics import ServerMetrics
from megatron.early_exit.server.protocol import (ProtocolError, ServerDefaults, build_requests,
                                                 front_field, parse_api, parse_chat,
                                                 parse_completions)
from megatron.early_exit.server.service import ServerFault, ServerUnavailable

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger(__name__)
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
POLL_S = 0.2  # how often a waiting handler checks for a disconnected client


@dataclass
class ServerConfig:
    defaults: ServerDefaults = field(default_factory=ServerDefaults)
    api_key: Optional[str] = None
    request_timeout: float = 300.0  # seconds per request
    max_body_bytes: int = 1 << 20
    pipeline: bool = False  # PP > 1: self-speculative requests are refused


class _Flight:
    """The requests of one HTTP request in flight; updates arrive on an asyncio queue."""

    def __init__(self, service, reqs, detokenize, holdback: int):
        self.service, self.queue = service, asyncio.Queue()
        self.ids: List[str] = []
        self.choices = [results.Choice(i, len(r.prompt), detokenize, holdback)
                        for i, r in enumerate(reqs)]
        loop = asyncio.get_running_loop()
        try:
            for i, req in enumerate(reqs):
                self.ids.append(service.submit(req, self._sink(loop, i)))
        except BaseException:
            self.cancel()
            raise

    def _sink(self, loop, i):
        def sink(item):
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, item))
            except RuntimeError:  # the event loop is gone (server stopping)
                pass
        return sink

    def cancel(self) -> None:
        for i, rid in enumerate(self.ids):
            if not self.choices[i].finished:
                self.service.cancel(rid)

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    async def events(self, request: Request, timeout: float):
        """Yield (choice, deltas) per update until every choice is finished; cancels on
        disconnect (then stops) or timeout (the choices end with finish_reason "timeout")."""
        deadline = time.monotonic() + timeout
        timed_out, last_check = False, time.monotonic()
        while not self.done:
            try:
                i, item = await asyncio.wait_for(self.queue.get(), POLL_S)
            except asyncio.TimeoutError:
                i = item = None
            now = time.monotonic()
            if now - last_check >= POLL_S:
                last_check = now
                if await request.is_disconnected():
                    self.cancel()
                    return
            if not timed_out and now > deadline:
                timed_out = True
                self.cancel()
                deadline = now + 30.0  # the cancelled finals come at the next step
            elif timed_out and now > deadline:
                raise ServerFault("cancelled requests did not finish")
            if item is None:
                continue
            choice = self.choices[i]
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            if timed_out and item.finished and item.finish_reason == "cancelled":
                item.finish_reason = "timeout"
            yield choice, choice.feed(item)


def _error(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def _map_exception(e: BaseException, job=None) -> JSONResponse:
    if isinstance(e, ProtocolError):
        return _error(e.status, e.message, e.field)
    if isinstance(e, QueueFull):
        return _error(429, f"the server is busy: {e}; retry later")
    if isinstance(e, RequestError):  # refused by the Scheduler (e.g. its cached-token budget)
        name = front_field(job.kind, e.field, job.mode) if job is not None else e.field
        return _error(400, e.message, name)
    if isinstance(e, ServerUnavailable):
        return _error(503, str(e))
    if isinstance(e, ServerFault):
        log.error("server fault: %s", e)
        return _error(500, str(e))
    raise e


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _Handlers:
    def __init__(self, service, tokenizer, cfg, config: ServerConfig, chat_template, metrics):
        self.service, self.tokenizer, self.cfg, self.config = service, tokenizer, cfg, config
        self.chat_template, self.metrics = chat_template, metrics
        self.model = config.defaults.model_name

    def _prepare(self, parse, body: bytes):
        job = parse(body, self.config.defaults)
        reqs = build_requests(job, self.tokenizer, self.cfg, self.chat_template,
                              pipeline=self.config.pipeline)
        holdback = max((len(s) for s in job.stop_strings), default=1) - 1
        return job, reqs, holdback

    async def run(self, request: Request, endpoint: str, parse):
        start = time.monotonic()
        try:
            body = await request.body()
            # parsing, chat templates and tokenization may take a while on a long prompt: off
            # the event loop, so other requests keep streaming meanwhile
            job, reqs, holdback = await run_in_threadpool(self._prepare, parse, body)
            flight = _Flight(self.service, reqs, self.tokenizer.detokenize, holdback)
        except (ProtocolError, QueueFull, RequestError, ServerFault) as e:
            resp = _map_exception(e)
            self.metrics.request(endpoint, resp.status_code)
            return resp
        if job.stream:
            self.metrics.request(endpoint, 200)
            return StreamingResponse(self._stream(request, job, reqs, flight, start),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            first = None
            async for _choice, deltas in flight.events(request, self.config.request_timeout):
                if first is None and deltas:
                    first = time.monotonic()
                    self.metrics.first_token(first - start)
        except (QueueFull, RequestError, ServerFault) as e:
            resp = _map_exception(e, job)
            self.metrics.request(endpoint, resp.status_code)
            return resp
        if not flight.done:  # the client went away
            self.metrics.request(endpoint, 499)
            return Response(status_code=499)
        self.metrics.request(endpoint, 200)
        self.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - start)
        return JSONResponse(self._body(job, reqs, flight.choices))

    def _body(self, job, reqs, choices):
        lens = [len(r.prompt) for r in reqs]
        rid, created = uuid.uuid4().hex[:24], int(time.time())
        if job.kind == "api":
            return results.api_response(job.prompts, choices, job.extra.get("echo_prompts", True),
                                        job.logprobs)
        if job.kind == "chat":
            return results.chat_response(f"chatcmpl-{rid}", created, self.model, choices, lens)
        return results.completion_response(f"cmpl-{rid}", created, self.model, choices, lens)

    async def _stream(self, request, job, reqs, flight, start):
        chunk = results.chat_chunk if job.kind == "chat" else results.completion_chunk
        rid = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created, detok, first, started = int(time.time()), self.tokenizer.detokenize, None, set()
        extra = lambda i: {"first": i not in started} if job.kind == "chat" else {}  # noqa: E731
        try:
            async for choice, deltas in flight.events(request, self.config.request_timeout):
                for k, (delta, tok, layer, conf, lp) in enumerate(deltas):
                    if first is None and tok is not None:
                        first = time.monotonic()
                        self.metrics.first_token(first - start)
                    last = choice.finished and k == len(deltas) - 1
                    yield _sse(chunk(rid, created, self.model, choice.index, delta, tok, layer,
                                     conf, lp, choice.finish_reason if last else None, detok,
                                     **extra(choice.index)))
                    started.add(choice.index)
                if choice.finished and not deltas:
                    yield _sse(chunk(rid, created, self.model, choice.index, "",
                                     finish_reason=choice.finish_reason, **extra(choice.index)))
                    started.add(choice.index)
            if job.include_usage and flight.done:
                yield _sse({"id": rid, "object": chunk(rid, created, self.model, 0, "")["object"],
                            "created": created, "model": self.model, "choices": [],
                            "usage": results.usage(flight.choices, [len(r.prompt) for r in reqs])})
        except (QueueFull, RequestError, ServerFault) as e:
            resp = _map_exception(e, job)
            yield b"data: " + resp.body + b"\n\n"
        finally:
            flight.cancel()  # no-op unless the client left mid-stream (or an error)
        yield b"data: [DONE]\n\n"

    def models(self):
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                            "owned_by": "megatron-early-exit"}]}

    def health(self):
        if not self.service.alive:
            return _error(503, "the engine loop is not running")
        return {"status": "ok", "running": self.service.num_running,
                "waiting": self.service.num_waiting}

    def info(self):
        c = self.cfg
        return {"model": self.model, "num_layers": c.model.num_layers,
                "exit_layers": list(c.exits.exit_layer_nums),
                "max_positions": c.model.max_position_embeddings,
                "chat_template": self.chat_template is not None,
                "early_exit_thres": self.config.defaults.early_exit_thres,
                "self_speculative": not self.config.pipeline and bool(c.exits.exit_layer_nums)}


def create_app(service, tokenizer, cfg, config: Optional[ServerConfig] = None,
               chat_template=None, metrics: Optional[ServerMetrics] = None) -> FastAPI:
    """The ASGI app over a started GenerationService (wrapped in the auth / body-limit Guard)."""
    config = config or ServerConfig()
    if metrics is None:
        metrics = ServerMetrics(cfg.model.num_layers, service)
        service.on_step = metrics.on_step
    h = _Handlers(service, tokenizer, cfg, config, chat_template, metrics)
    app = FastAPI(title="megatron-early-exit generation server", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.handlers, app.state.metrics = h, metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # 404 / 405 in our JSON shape
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.exception_handler(Exception)
    async def _fault(request, exc):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(500, "internal server error (logged)")

    @app.put("/api")
    async def api(request: Request):
        return await h.run(request, "api", parse_api)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await h.run(request, "completions", parse_completions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await h.run(request, "chat", parse_chat)

    app.get("/v1/models")(h.models)
    app.get("/health")(h.health)
    app.get("/info")(h.info)

    @app.get("/metrics")
    def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/")
    def page():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    return Guard(app, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
