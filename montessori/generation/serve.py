"""`montessori serve MODEL --port P`: an OpenAI-compatible server over the transformers backend.

Starlette on uvicorn. Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions (messages, n,
temperature, top_p, max_tokens, presence_penalty, repetition_penalty, seed; `continue_final_message`
continues a final assistant message, i.e. a prefill; `stream` is not supported). Other request fields
are ignored, as OpenAI-compatible servers do.

What keeps it up under load or bad input:
- every request is parsed and checked (pydantic, strict types, bounded fields; `max_tokens` plus the
  prompt's tokens within the model's context) before it is admitted: a request that can never succeed
  gets its 400 (malformed, over the context) or 404 (a model the server does not serve) at once, also
  when the queue is full (a 503 would send a retrying client round forever);
- one generation runs at a time (the model is shared); at most `max_pending` requests run or wait,
  the next gets 503 with Retry-After at once; the listen backlog is 2048, so a burst of connections
  waits in the kernel instead of being reset;
- the body must arrive within `body_timeout` (a short body under a long Content-Length gets 408), a
  request is answered within `request_timeout` (504), and a generation stops within one decoding step
  (one token for every sampled row) once its client hangs up, its time is up or the server stops.
With --api-key-env the server requires `Authorization: Bearer <key>` (read from that variable, never a
flag, so it stays out of shell history and process lists; compared in constant time).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Literal

import h11
import uvicorn
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from montessori.generation.backends.base import Request, Sampling
from montessori.models.chat import prompt_text

log = logging.getLogger(__name__)

BACKLOG = 2048  # pending TCP connections the kernel queues (capped by net.core.somaxconn)
NO_CONTEXT_LIMIT = 32768  # max_tokens cap when the model states no context length


@dataclass
class Limits:
    max_pending: int = 16  # requests running or waiting for the model; the next one gets 503
    max_n: int = 16
    request_timeout: float = 600.0  # seconds from the body's arrival to the answer, waiting included
    body_timeout: float = 30.0  # seconds for the whole body to arrive
    max_body_bytes: int = 4 << 20
    max_connections: int = 512  # open connections; beyond, uvicorn answers 503 itself


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request this server honours, each typed and bounded."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: StrictStr | None = None  # None: the served model
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    n: Annotated[int, Field(ge=1)] = 1  # capped by Limits.max_n
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # capped by the model's context
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer OpenAI name
    seed: Annotated[int, Field(ge=0, lt=2 ** 63)] | None = None
    continue_final_message: StrictBool = False
    stream: StrictBool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def error_response(status: int, message: str, kind: str, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status, headers=headers)


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


def context_length(backend) -> int | None:
    config = backend.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(config, "max_position_embeddings", None)
    if n is None and backend.tokenizer is not None and backend.tokenizer.model_max_length < 10 ** 7:
        n = backend.tokenizer.model_max_length
    return int(n) if n else None


class _Job:
    """One admitted request; `stop` is polled by the backend between decoding steps."""

    def __init__(self, deadline: float, server_stopping):
        self.deadline, self.server_stopping = deadline, server_stopping
        self.disconnected = threading.Event()
        self.stopped = False

    def stop(self) -> bool:
        if self.disconnected.is_set() or time.monotonic() > self.deadline or self.server_stopping():
            self.stopped = True
        return self.stopped


class ChatServer:
    """The app and its uvicorn server on a socket bound at construction (port 0 picks a free port).

    `serve_forever()` blocks (call it from a thread in tests), `shutdown()` stops it and waits,
    `server_close()` closes the socket: the interface of the stdlib servers it replaced."""

    def __init__(self, backend, model_name: str, host: str = "127.0.0.1", port: int = 0, *,
                 served_model_name: str | None = None, api_key: str | None = None, fail_first: int = 0,
                 limits: Limits | None = None):
        self.backend, self.model_name, self.limits = backend, model_name, limits or Limits()
        self.names = [served_model_name, model_name] if served_model_name else [model_name]
        self.api_key = api_key
        self.fail_first = fail_first  # answer this many chat requests with 503 (tests clients' retries)
        self.requests = 0  # chat requests received (after auth)
        self.pending = 0  # admitted requests, running or waiting (event-loop thread only)
        self.running = 0  # generations in progress (0 or 1)
        self.context = context_length(backend)
        # The model thread generates; a second thread with its own tokenizer copy counts prompt tokens,
        # so an over-long prompt is refused without waiting for the model (a fast tokenizer must not be
        # used from two threads at once).
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="serve-model")
        self.count_pool = ThreadPoolExecutor(1, thread_name_prefix="serve-tokens")
        self.count_tokenizer = copy.deepcopy(backend.tokenizer)
        self.socket = socket.create_server((host, port), backlog=BACKLOG)
        config = uvicorn.Config(make_app(self), log_config=None, access_log=False, lifespan="off",
                                http=_JSONErrorsH11, backlog=BACKLOG, limit_concurrency=self.limits.max_connections,
                                timeout_keep_alive=5, timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self._done = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}/v1"

    def serve_forever(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self._done.wait(30)

    def server_close(self) -> None:
        self.socket.close()
        self.model_pool.shutdown(wait=False, cancel_futures=True)
        self.count_pool.shutdown(wait=False, cancel_futures=True)

    # --- request handling ------------------------------------------------------------------------

    def check_key(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid API key", "authentication_error", "invalid_api_key")

    def served_name(self, asked: str | None) -> str:
        if asked is None:
            return self.names[0]
        if asked not in self.names:
            served = " or ".join(f"'{n}'" for n in self.names)
            raise APIError(404, f"model '{asked}' is not served here (this server serves {served})",
                           code="model_not_found")
        return asked

    async def read_body(self, request: HTTPRequest) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes is over the limit of "
                                f"{self.limits.max_body_bytes}")

        async def collect() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.limits.max_body_bytes:
                    raise APIError(413, f"request body is over the limit of {self.limits.max_body_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(collect(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s "
                                f"(is Content-Length right?)") from None

    def parse(self, raw: bytes) -> ChatRequest:
        try:
            body = ChatRequest.model_validate_json(raw or b"{}")
        except ValidationError as err:
            raise APIError(400, _validation_message(err)) from None
        if body.stream:
            raise APIError(400, "stream: streaming is not supported by this server; send stream=false")
        if body.n > self.limits.max_n:
            raise APIError(400, f"n: {body.n} is over this server's limit of {self.limits.max_n}")
        if body.continue_final_message and body.messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs a final assistant message to continue")
        return body

    def count_tokens(self, messages: list[dict], prefill: str) -> int:
        try:
            text = prompt_text(self.count_tokenizer, messages, prefill)
        except (TemplateError, ValueError) as err:  # e.g. a template that wants alternating roles
            raise APIError(400, f"messages: the model's chat template refuses them ({err})") from None
        return len(self.count_tokenizer(text, add_special_tokens=False)["input_ids"])

    def max_new_tokens(self, body: ChatRequest, prompt_tokens: int) -> int:
        asked = body.max_tokens or body.max_completion_tokens
        room = (self.context or NO_CONTEXT_LIMIT + prompt_tokens) - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; the model's context is {self.context}",
                           code="context_length_exceeded")
        if asked is not None and asked > room:
            limit = f"the model's context is {self.context}" if self.context else f"the limit is {room}"
            raise APIError(400, f"max_tokens: {asked} + {prompt_tokens} prompt tokens do not fit ({limit})",
                           code="context_length_exceeded")
        return asked or min(256, room)

    async def chat(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        self.requests += 1
        if self.fail_first > 0:
            self.fail_first -= 1
            raise APIError(503, "simulated overload (--fail-first)", "server_error", headers={"Retry-After": "0.1"})
        raw = await self.read_body(request)
        start = time.monotonic()
        # Everything that can never succeed is refused before admission, full queue or not.
        body = self.parse(raw)
        name = self.served_name(body.model)
        asked = body.max_tokens or body.max_completion_tokens
        if self.context and asked is not None and asked >= self.context:  # too long whatever the prompt
            raise APIError(400, f"max_tokens: {asked} does not fit the model's context of {self.context} tokens "
                                f"(the prompt needs at least one)", code="context_length_exceeded")
        messages = [m.model_dump() for m in body.messages]
        prefill = ""
        if body.continue_final_message:
            prefill, messages = messages[-1]["content"], messages[:-1]
        loop = asyncio.get_running_loop()
        prompt_tokens = await loop.run_in_executor(self.count_pool, self.count_tokens, messages, prefill)
        max_new_tokens = self.max_new_tokens(body, prompt_tokens)
        if self.pending >= self.limits.max_pending:
            raise APIError(503, f"the server is busy ({self.pending} requests running or waiting); retry later",
                           "server_error", "overloaded", headers={"Retry-After": "1"})
        self.pending += 1  # from here the request holds a place: waiting, generating
        try:
            return await self._answer(request, body, name, start, messages, prefill, prompt_tokens, max_new_tokens)
        finally:
            self.pending -= 1

    async def _answer(self, request: HTTPRequest, body: ChatRequest, name: str, start: float, messages: list[dict],
                      prefill: str, prompt_tokens: int, max_new_tokens: int) -> Response:
        loop = asyncio.get_running_loop()
        sampling = Sampling(n=body.n, temperature=body.temperature, top_p=body.top_p,
                            presence_penalty=body.presence_penalty, repetition_penalty=body.repetition_penalty,
                            max_new_tokens=max_new_tokens)
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        job = _Job(start + self.limits.request_timeout, lambda: self.uvicorn.should_exit)
        future = loop.run_in_executor(self.model_pool, self._generate, Request(messages, prefill, seed), sampling, job)
        try:
            while not future.done():  # watch for a hang-up while the request waits and the model works
                await asyncio.wait({future}, timeout=0.2)
                if not future.done() and await request.is_disconnected():
                    job.disconnected.set()  # a running generation stops at its next step (job.stop)
                    future.cancel()  # a waiting one never starts, and its place is free now
        except asyncio.CancelledError:  # the server dropped the request: stop its generation too
            job.disconnected.set()
            future.cancel()
            raise
        if job.disconnected.is_set():
            log.info("client hung up: generation cancelled")
            return Response(status_code=499)  # nobody reads it
        completions = future.result()
        if job.stopped:
            if self.uvicorn.should_exit:
                raise APIError(503, "the server is shutting down", "server_error")
            raise APIError(504, f"not answered within {self.limits.request_timeout:g} s (request_timeout)",
                           "server_error", "timeout")
        tokens = sum(c.tokens for c in completions)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason} for i, c in enumerate(completions)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                      "total_tokens": prompt_tokens + tokens}})

    def _generate(self, request: Request, sampling: Sampling, job: _Job):
        if job.stop():  # hung up or timed out while waiting: do not start
            return []
        self.running += 1
        try:
            (completions,) = self.backend.generate([request], sampling, stop=job.stop)
        finally:
            self.running -= 1
        return completions

    async def models(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "owned_by": "montessori"}
                                                        for n in self.names]})

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.names[0], "running": self.running,
                             "pending": self.pending})


def make_app(server: ChatServer) -> Starlette:
    async def api_error(request, err: APIError):
        return error_response(err.status, err.message, err.kind, err.code, err.headers)

    async def http_error(request, err: HTTPException):  # unknown route, wrong method
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, f"{request.method} {request.url.path}: {err.detail}", kind,
                              headers=err.headers)

    async def disconnected(request, err: ClientDisconnect):
        return Response(status_code=499)

    async def internal_error(request, err: Exception):
        log.exception("request failed")
        return error_response(500, f"internal error: {type(err).__name__}", "server_error")

    routes = [Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/health", server.health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                        ClientDisconnect: disconnected, Exception: internal_error})


class _JSONErrorsH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but a request it cannot parse (a Content-Length that is not a
    number, a broken header) gets its 400 as the same JSON error body as every other refusal."""

    def send_400_response(self, msg: str) -> None:
        payload = json.dumps({"error": {"message": "malformed HTTP request (a header or Content-Length that "
                                                   "cannot be parsed)",
                                        "type": "invalid_request_error", "code": None}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=payload),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def make_server(backend, model_name: str, host: str = "127.0.0.1", port: int = 0, **kwargs) -> ChatServer:
    return ChatServer(backend, model_name, host, port, **kwargs)


def cmd_serve(args) -> int:
    from montessori.errors import InputError
    from montessori.generation.backends.hf import TransformersBackend
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise InputError(f"--api-key-env {args.api_key_env}: the environment variable is not set")
    for flag in ("max_pending", "max_n"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.request_timeout <= 0:
        raise InputError("--request-timeout must be positive")
    try:
        backend = TransformersBackend.load(args.model, device=args.device, dtype=args.dtype)
        limits = Limits(max_pending=args.max_pending, max_n=args.max_n, request_timeout=args.request_timeout)
        try:
            server = make_server(backend, args.model, args.host, args.port, api_key=api_key, limits=limits,
                                 served_model_name=args.served_model_name, fail_first=args.fail_first)
        except OSError as err:
            raise InputError(f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror})") from None
        names = " or ".join(server.names)
        print(f"serving {names} at {server.url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()  # returns after SIGINT/SIGTERM, once open requests are answered
        finally:
            server.server_close()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, or Ctrl-C came during loading
        pass
    print("serve: stopped", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (chat completions)")
    p.add_argument("model", help="model spec: smollm2, a .gguf file, an HF dir, tiny-random:N, a Hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="a name clients may ask for besides the model spec (the `model` of a request)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on every request")
    p.add_argument("--max-pending", type=int, default=Limits.max_pending, metavar="N",
                   help="requests running or waiting for the model; beyond, answer 503 at once")
    p.add_argument("--max-n", type=int, default=Limits.max_n, metavar="N", help="largest `n` of a request")
    p.add_argument("--request-timeout", type=float, default=Limits.request_timeout, metavar="S",
                   help="seconds to answer a request, waiting included; then 504 and the generation stops")
    p.add_argument("--fail-first", type=int, default=0, metavar="N",
                   help="answer the first N chat requests with HTTP 503 (to test clients' retries)")
    p.set_defaults(func=cmd_serve)
