"""OpenAI-compatible chat-completions client: served models (vLLM, llama.cpp, `montessori serve`) and
API teachers (the GPT-4o "strong teacher" baseline).

On httpx: one connection pool per backend (reused across requests and stages' calls, closed by
`close()`), requests `concurrency` at a time from threads; 429 and 5xx answers, connection errors and
timeouts are retried with exponential backoff (honouring Retry-After); 401/403 stop the run with an
error that names the environment variable holding the key. The key itself is read from the
environment when a request is sent and is never stored in a record, a manifest or a log line.

The answer must come from the model asked for: a 404 (the server does not serve it) or an answer
whose `model` is another model's is an error, never text recorded under the wrong teacher. (OpenAI
answers a model alias with its dated snapshot, `gpt-4o` with `gpt-4o-2024-08-06`: that counts as the
same model.)

A prefill is sent as a final assistant message with `continue_final_message` (vLLM and `montessori
serve` continue it; APIs that do not support it should use the `tagged` prompt style).
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from montessori.errors import InputError, MontessoriError
from montessori.generation.backends.base import Backend, Completion, Request, Sampling

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class HTTPBackend(Backend):
    name = "http"

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 1.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.retries = 0  # retried requests so far (shown in logs and tests)
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:  # one pool for all threads (httpx.Client is thread-safe)
                self._client = self._new_client()
        return self._client

    def _new_client(self) -> httpx.Client:
        limits = httpx.Limits(max_connections=max(1, self.concurrency),
                              max_keepalive_connections=max(1, self.concurrency))
        return httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 30.0)), limits=limits)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))

    def _body(self, request: Request, sampling: Sampling) -> dict:
        messages = list(request.messages)
        body = {"model": self.model, "n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "presence_penalty": sampling.presence_penalty, "max_tokens": sampling.max_new_tokens,
                "seed": request.seed}
        if sampling.repetition_penalty != 1.0:  # not an OpenAI field; vLLM and `montessori serve` read it
            body["repetition_penalty"] = sampling.repetition_penalty
        if request.prefill:
            messages.append({"role": "assistant", "content": request.prefill})
            body.update(continue_final_message=True, add_generation_prompt=False)
        body["messages"] = messages
        return body

    def _one(self, request: Request, sampling: Sampling) -> list[Completion]:
        data = self._post(self._body(request, sampling))
        self._check_model(data.get("model"))
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != sampling.n:
            raise MontessoriError(f"{self.url}: asked for n={sampling.n} completions, got {len(choices)} "
                                  f"(the server may not support n > 1)")
        total = (data.get("usage") or {}).get("completion_tokens")
        out = []
        for c in choices:
            text = (c.get("message") or {}).get("content") or ""
            out.append(Completion(text, 0, "length" if c.get("finish_reason") == "length" else "stop"))
        # Servers report tokens per request; spread them over the choices (counts are for throughput).
        if total is not None:
            for i, comp in enumerate(out):
                comp.tokens = total // len(out) + (1 if i < total % len(out) else 0)
        return out

    def _check_model(self, answered) -> None:
        if answered is None:  # the server does not say (some minimal servers): nothing to check against
            return
        if answered != self.model and not re.fullmatch(re.escape(self.model) + r"-\d{4}-\d{2}-\d{2}", str(answered)):
            raise InputError(f"{self.url}: asked for model '{self.model}' but '{answered}' answered: that server "
                             f"serves another model (generation.base_url)")

    def _post(self, body: dict) -> dict:
        for attempt in range(self.max_retries + 1):
            headers = {}
            key = os.environ.get(self.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            try:
                resp = self.client.post(self.url, json=body, headers=headers)
            except httpx.TransportError as err:  # refused, reset, timed out
                reason = str(err) or type(err).__name__
                if attempt == self.max_retries:
                    raise MontessoriError(f"{self.url}: {reason} after {attempt + 1} attempt(s); "
                                          f"is the server running?") from None
                wait = self.backoff * 2 ** attempt
            else:
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                        if isinstance(data, dict):
                            return data
                    except ValueError:
                        pass
                    raise MontessoriError(f"{self.url}: the answer is not a JSON object: {resp.text[:200]!r}")
                detail = _error_detail(resp)
                if resp.status_code in (401, 403):
                    state = "is set but was refused" if key else "is not set"
                    raise MontessoriError(f"{self.url}: HTTP {resp.status_code} ({detail}): the API key in "
                                          f"environment variable {self.api_key_env} {state} "
                                          f"(generation.api_key_env)") from None
                if resp.status_code == 404:
                    raise InputError(f"{self.url}: HTTP 404 ({detail}): no model '{self.model}' there (serve it, "
                                     f"e.g. `montessori serve {self.model}`, or point generation.base_url, "
                                     f"ending in /v1, at a server that does)")
                if resp.status_code not in RETRY_STATUS or attempt == self.max_retries:
                    raise MontessoriError(f"{self.url}: HTTP {resp.status_code} ({detail}) after {attempt + 1} "
                                          f"attempt(s)")
                wait = _retry_after(resp) or self.backoff * 2 ** attempt
                reason = f"HTTP {resp.status_code}"
            wait *= random.uniform(1.0, 1.25)  # jitter: threads that failed together do not retry together
            with self._lock:
                self.retries += 1
            log.warning("%s: %s, retry %d of %d in %.1fs", self.url, reason, attempt + 1, self.max_retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")


def _error_detail(resp: httpx.Response) -> str:
    try:
        return str((resp.json().get("error") or {}).get("message") or resp.reason_phrase)
    except (ValueError, AttributeError):
        return resp.reason_phrase or resp.text[:200]


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None
