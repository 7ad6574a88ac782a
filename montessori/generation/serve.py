"""`montessori serve MODEL --port P`: a small OpenAI-compatible server over the transformers backend.

Endpoints: GET /v1/models, POST /v1/chat/completions (messages, n, temperature, top_p, max_tokens,
presence_penalty, repetition_penalty, seed; `continue_final_message` continues a final assistant
message, i.e. a prefill). One request generates at a time: the model is shared. With --api-key-env the
server requires `Authorization: Bearer <key>` (the key is read from that variable, never a flag, so it
stays out of shell history and process lists).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from montessori.generation.backends.base import Request, Sampling

log = logging.getLogger(__name__)


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, backend, model_name: str, *, api_key: str | None = None, fail_first: int = 0):
        super().__init__(address, ChatHandler)
        self.backend, self.model_name, self.api_key = backend, model_name, api_key
        self.fail_first = fail_first  # answer this many chat requests with 503 (tests clients' retries)
        self.lock = threading.Lock()
        self.requests = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def complete(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        prefill = ""
        if body.get("continue_final_message") and messages[-1].get("role") == "assistant":
            prefill, messages = messages[-1].get("content") or "", messages[:-1]
        sampling = Sampling(n=int(body.get("n") or 1), temperature=float(body.get("temperature", 1.0)),
                            top_p=float(body.get("top_p", 1.0)),
                            presence_penalty=float(body.get("presence_penalty") or 0.0),
                            repetition_penalty=float(body.get("repetition_penalty") or 1.0),
                            max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 256))
        seed = body.get("seed")
        seed = int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        with self.lock:
            (completions,) = self.backend.generate([Request(messages, prefill, seed)], sampling)
        tokens = sum(c.tokens for c in completions)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model") or self.model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason} for i, c in enumerate(completions)],
                "usage": {"completion_tokens": tokens}}


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, fmt, *args):  # through logging, not stderr; never the headers (the key)
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, data: dict, headers: dict | None = None) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind}}, headers)

    def _authorized(self) -> bool:
        if self.server.api_key is None:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.server.api_key}":
            return True
        self._error(401, "invalid API key", "authentication_error")
        return False

    def do_GET(self):
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "montessori"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "not_found")
        if not self._authorized():
            return
        with self.server.lock:
            self.server.requests += 1
            fail = self.server.fail_first > 0
            self.server.fail_first -= fail
        if fail:
            return self._error(503, "simulated overload (--fail-first)", "server_error", {"Retry-After": "0.1"})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            self._send(200, self.server.complete(body))
        except (ValueError, TypeError, AttributeError) as err:
            self._error(400, str(err), "invalid_request_error")


def make_server(backend, model_name: str, host: str = "127.0.0.1", port: int = 0, *,
                api_key: str | None = None, fail_first: int = 0) -> ChatServer:
    return ChatServer((host, port), backend, model_name, api_key=api_key, fail_first=fail_first)


def cmd_serve(args) -> int:
    from montessori.errors import InputError
    from montessori.generation.backends.hf import TransformersBackend
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise InputError(f"--api-key-env {args.api_key_env}: the environment variable is not set")
    backend = TransformersBackend.load(args.model, device=args.device, dtype=args.dtype)
    server = make_server(backend, args.model, args.host, args.port, api_key=api_key, fail_first=args.fail_first)
    print(f"serving {args.model} at {server.url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (chat completions)")
    p.add_argument("model", help="model spec: smollm2, a .gguf file, an HF dir, tiny-random:N, a Hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on every request")
    p.add_argument("--fail-first", type=int, default=0, metavar="N",
                   help="answer the first N chat requests with HTTP 503 (to test clients' retries)")
    p.set_defaults(func=cmd_serve)
