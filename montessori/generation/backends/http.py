"""OpenAI-compatible chat-completions client: served models (vLLM, llama.cpp, `montessori serve`) and
API teachers (the GPT-4o "strong teacher" baseline).

Stdlib only (urllib + threads). Requests run `concurrency` at a time; 429 and 5xx answers and
connection errors are retried with exponential backoff (honouring Retry-After); 401/403 stop the run
with an error that names the environment variable holding the key. The key itself is read from the
environment when a request is sent and is never stored in a record, a manifest or a log line.

A prefill is sent as a final assistant message with `continue_final_message` (vLLM and `montessori
serve` continue it; APIs that do not support it should use the `tagged` prompt style).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from montessori.errors import MontessoriError
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
        choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
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

    def _post(self, body: dict) -> dict:
        payload = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            headers = {"Content-Type": "application/json"}
            key = os.environ.get(self.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code in (401, 403):
                    state = "is set but was refused" if key else "is not set"
                    raise MontessoriError(f"{self.url}: HTTP {err.code} ({detail}): the API key in environment "
                                          f"variable {self.api_key_env} {state} (generation.api_key_env)") from None
                if err.code not in RETRY_STATUS or attempt == self.max_retries:
                    raise MontessoriError(f"{self.url}: HTTP {err.code} ({detail}) after {attempt + 1} "
                                          f"attempt(s)") from None
                wait = _retry_after(err) or self.backoff * 2 ** attempt
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == self.max_retries:
                    raise MontessoriError(f"{self.url}: {getattr(err, 'reason', err)} after {attempt + 1} "
                                          f"attempt(s); is the server running?") from None
                wait, reason = self.backoff * 2 ** attempt, str(getattr(err, "reason", err))
            self.retries += 1
            log.warning("%s: %s, retry %d of %d in %.1fs", self.url, reason, attempt + 1, self.max_retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
        return str((body.get("error") or {}).get("message") or err.reason)
    except (ValueError, AttributeError):
        return str(err.reason)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None
