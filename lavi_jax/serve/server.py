"""The HTTP front (FastAPI on uvicorn): OpenAI's chat-completions API over an :class:`~lavi_jax.serve.engine.Engine`.

    app = create_app(engine, builder, fetcher, model_name="lavi")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``POST /v1/chat/completions`` (``stream: true``: server-sent events ending in ``data: [DONE]``),
``GET /v1/models``, ``GET /health`` (503 once the engine failed), ``GET /metrics`` (Prometheus text).
Bad input answers a 4xx with OpenAI's error body and touches no other request; a full queue answers 429.
A client that disconnects has its request cancelled: its slot is free at the engine's next step.
The engine starts with the app and, on shutdown (uvicorn's on SIGTERM, after the requests in flight
finished), stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from lavi_jax.serve import protocol
from lavi_jax.serve.engine import QueueFull, RequestError
from lavi_jax.serve.media_fetch import MediaError
from lavi_jax.serve.metrics import Metrics
from lavi_jax.serve.protocol import APIError

FINISH = {"stop": "stop", "length": "length"}


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine, builder, fetcher, *, model_name: str = "lavi") -> FastAPI:
    metrics = Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="lavi_jax", lifespan=lifespan)
    created = int(time.time())

    @app.get("/health")
    async def health():
        if engine.error:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lavi_jax"}]}

    @app.get("/metrics")
    async def prometheus():
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    def build(chat):
        try:
            media = [fetcher.item(kind, url) for kind, url in chat.media]
            return builder.request(chat.messages, media, **chat.knobs)
        except (MediaError, RequestError) as e:
            param = "messages" if not isinstance(e, RequestError) or "max_tokens" not in str(e) else "max_tokens"
            raise APIError(400, str(e), param) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        try:
            try:
                body = json.loads(await http.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise APIError(400, f"the body is not valid JSON: {e}") from None
            chat = protocol.parse_chat(body, model_name)
            req = await run_in_threadpool(build, chat)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            try:
                engine.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
            except QueueFull as e:
                raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
            except RequestError as e:
                raise APIError(400, str(e), "max_tokens" if "max_tokens" in str(e) else "messages") from None
            except RuntimeError as e:
                raise APIError(503, str(e), None, None, "server_error") from None
        except APIError as e:
            return _error(e)
        cid = protocol.completion_id()
        if chat.stream:
            return StreamingResponse(_stream(req, events, cid, chat, metrics, model_name),
                                     media_type="text/event-stream")
        text = ""
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    req.cancel()
                    return Response(status_code=499)
                continue
            text += ev.delta
            if ev.finish_reason is not None:
                break
        metrics.observe(req)
        if ev.finish_reason == "error":
            return _error(APIError(500, ev.error or "the engine failed", None, None, "server_error"))
        return protocol.response(cid, model_name, text.strip(), FINISH.get(ev.finish_reason, "stop"),
                                 req.prompt_tokens, len(req.tokens))

    return app


async def _stream(req, events, cid, chat, metrics, model_name):
    """Server-sent events: a role chunk, text chunks, the finish chunk, (usage), ``[DONE]``."""
    send = lambda obj: f"data: {json.dumps(obj)}\n\n"
    finished, started = False, False
    try:
        yield send(protocol.chunk(cid, model_name, {"role": "assistant", "content": ""}))
        while True:
            ev = await events.get()
            delta = ev.delta if started else ev.delta.lstrip()  # as the non-streamed answer, stripped on the left
            started = started or bool(delta)
            if ev.finish_reason is not None:
                finished = True
                metrics.observe(req)
                if delta:
                    yield send(protocol.chunk(cid, model_name, {"content": delta}))
                if ev.finish_reason == "error":
                    yield send(APIError(500, ev.error or "the engine failed", None, None, "server_error").body())
                else:
                    yield send(protocol.chunk(cid, model_name, {}, FINISH.get(ev.finish_reason, "stop")))
                if chat.include_usage:
                    yield send(protocol.chunk(cid, model_name, None, usage_=protocol.usage(req.prompt_tokens,
                                                                                          len(req.tokens))))
                yield "data: [DONE]\n\n"
                return
            if delta:
                yield send(protocol.chunk(cid, model_name, {"content": delta}))
    finally:
        if not finished:  # the client went away: free the slot
            req.cancel()
