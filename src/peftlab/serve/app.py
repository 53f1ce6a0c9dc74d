"""The OpenAI-compatible HTTP API over an :class:`~peftlab.serve.engine.Engine` (FastAPI, run by uvicorn).

    GET  /v1/models                     the base model and every served adapter
    POST /v1/completions                a prompt, formatted as ``peftlab generate`` formats it
    POST /v1/chat/completions           messages, through the model's chat template
    POST /v1/admin/adapters             {"name": ..., "path": optional folder below --adapter-root}  (--allow-admin)
    DELETE /v1/admin/adapters/{name}    stop serving an adapter                                     (--allow-admin)

``model`` picks an adapter by its operator-given name, or the base by its name. ``"stream": true``
answers with server-sent events (``data: {chunk}`` ... ``data: [DONE]``). Every error is OpenAI's
JSON error. The engine runs in its own thread; a request waits on an asyncio queue that the engine
feeds, and a client that goes away cancels its request, which frees its batch slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from peftlab.data.encode import chat_prompt_ids, prompt_ids
from peftlab.errors import UserError
from peftlab.serve import protocol
from peftlab.serve.adapters import AdapterBusy
from peftlab.serve.engine import BASE, Engine, QueueFull, Request, Sampling
from peftlab.serve.protocol import APIError, ChatRequest, CompletionRequest


@dataclass
class Limits:
    max_tokens: int = 512
    """The most tokens one request may ask for."""
    max_prompt_tokens: int = 4096
    """The most prompt tokens one request may send (after formatting)."""


def create_app(engine: Engine, *, base_name: str, chat: bool, limits: Limits, api_key: str | None = None,
               allow_admin: bool = False) -> FastAPI:
    """The app; ``chat``: completions prompts go through the chat template (as ``peftlab generate``'s auto)."""
    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                           code="invalid_api_key", type="authentication_error")

    app = FastAPI(title="peftlab", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(authorize)])
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, error: HTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else None
        return JSONResponse(APIError(error.status_code, str(error.detail), code=kind).body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(error.errors()[0].get("msg"))).body(), status_code=400)

    async def body_of(request: HTTPRequest) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    def adapter_of(name: str) -> str | None:
        if name == base_name:
            return BASE
        if name not in engine.served():
            raise APIError(404, f"the model {name!r} does not exist: GET /v1/models lists the served ones",
                           param="model", code="model_not_found")
        return name

    def sampling_of(body: protocol._Sampling, max_tokens: int | None, prompt_ids: list[int], adapter: str | None) -> Sampling:
        virtual = engine.virtual_tokens(adapter)
        if max_tokens is None:  # as much as the limit and the context allow
            room = limits.max_tokens if engine.context_length is None else engine.context_length - len(prompt_ids) - virtual
            max_tokens = max(1, min(limits.max_tokens, room))
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server allows at most "
                                f"{limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        needed = len(prompt_ids) + virtual + max_tokens
        if engine.context_length is not None and needed > engine.context_length:
            raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) need {needed} "
                                f"positions, more than the model's {engine.context_length}: shorten either",
                           param="max_tokens", code="context_length_exceeded")
        return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                        stop=tuple(body.stop or ()))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return protocol.model_list(base_name, engine.served())

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = protocol.parse(CompletionRequest, await body_of(request))
        adapter = adapter_of(body.model)
        ids = prompt_ids(tokenizer, body.prompt, is_seq2seq=False, chat=chat, max_length=10**9)
        sampling = sampling_of(body, body.max_tokens, ids, adapter)
        id_ = protocol.completion_id("cmpl")
        if body.stream:
            return stream(request, adapter, ids, sampling,
                          lambda text, finish: protocol.completion_chunk(id_, body.model, text, finish))
        text, finish, tokens = await complete(request, adapter, ids, sampling)
        return protocol.completion(id_, body.model, text, finish, len(ids), tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = protocol.parse(ChatRequest, await body_of(request))
        adapter = adapter_of(body.model)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model {base_name!r} has no chat template: use /v1/completions", param="messages")
        messages = [m.model_dump() for m in body.messages]
        ids = chat_prompt_ids(tokenizer, messages)
        sampling = sampling_of(body, body.max_completion_tokens or body.max_tokens, ids, adapter)
        id_ = protocol.completion_id("chatcmpl")
        if body.stream:
            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return protocol.chat_chunk(id_, body.model, {"content": text} if text or not finish else {}, finish)

            first = protocol.chat_chunk(id_, body.model, {"role": "assistant", "content": ""}, None)
            return stream(request, adapter, ids, sampling, chunk, first=first)
        text, finish, tokens = await complete(request, adapter, ids, sampling)
        return protocol.chat_completion(id_, body.model, text, finish, len(ids), tokens)

    def submit(adapter: str | None, ids: list[int], sampling: Sampling) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Request(adapter, ids, sampling,
                      on_event=lambda text, finish: loop.call_soon_threadsafe(events.put_nowait, (text, finish)))
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(429, "the server is busy (its request queue is full): retry later",
                           code="rate_limit_exceeded", type="rate_limit_error") from None
        return job, events

    def failed(finish: str) -> APIError:
        return APIError(500, finish.removeprefix("error: "), type="server_error")

    async def complete(request: HTTPRequest, adapter: str | None, ids: list[int], sampling: Sampling) -> tuple[str, str, int]:
        job, events = submit(adapter, ids, sampling)
        checked = time.monotonic()
        try:
            while True:
                try:
                    _, finish = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    finish = None
                if finish is not None:
                    break
                # every 0.25 s, whether or not tokens keep coming (they come faster than that while decoding)
                if time.monotonic() - checked >= 0.25:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        engine.cancel(job)  # frees the row for others
                        raise APIError(499, "the client closed the connection") from None
        except asyncio.CancelledError:
            engine.cancel(job)
            raise
        if finish.startswith("error"):
            raise failed(finish)
        return job.text, finish, len(job.tokens)

    def stream(request: HTTPRequest, adapter: str | None, ids: list[int], sampling: Sampling, chunk,
               first: dict[str, Any] | None = None) -> StreamingResponse:
        job, events = submit(adapter, ids, sampling)

        async def events_of() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    text, finish = await events.get()
                    if finish is not None and finish.startswith("error"):
                        yield f"data: {json.dumps(failed(finish).body())}\n\n"
                        break
                    yield f"data: {json.dumps(chunk(text, finish))}\n\n"
                    if finish is not None:
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the generator is closed) or the completion ended
                if job.finish_reason is None:
                    engine.cancel(job)

        return StreamingResponse(events_of(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/admin/adapters")
    async def load_adapter(request: HTTPRequest):
        admin_only()
        body = await body_of(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) \
                or not isinstance(body.get("path", ""), str):
            raise APIError(400, 'the body must be {"name": NAME} or {"name": NAME, "path": FOLDER below --adapter-root}')
        try:
            adapter = await asyncio.to_thread(engine.add_adapter, body["name"], body.get("path"))
        except UserError as e:
            raise APIError(400, str(e), param="path") from None
        except AdapterBusy:
            raise APIError(409, f"the adapter {body['name']!r} is in use: retry when its requests end") from None
        return {"id": adapter.name, "object": "model", "loaded": True, "kind": adapter.kind}

    @app.delete("/v1/admin/adapters/{name}")
    async def unload_adapter(name: str):
        admin_only()
        try:
            await asyncio.to_thread(engine.remove_adapter, name)
        except KeyError:
            raise APIError(404, f"no adapter is named {name!r}", param="name", code="model_not_found") from None
        except AdapterBusy:
            raise APIError(409, f"the adapter {name!r} is in use: retry when its requests end") from None
        return {"id": name, "object": "model", "deleted": True}

    def admin_only() -> None:
        if not allow_admin:
            raise APIError(403, "admin endpoints are off: start the server with --allow-admin",
                           type="permission_error")

    return app
