"""`montessori serve` under bad input and load, and the HTTP client's checks (issue 15), on 127.0.0.1
with a real tiny model. Long generations are cut short by the feature under test (hang-up, timeout)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from montessori.errors import InputError, MontessoriError
from montessori.generation.backends import make_backend
from montessori.generation.backends.base import Request, Sampling
from montessori.generation.backends.http import HTTPBackend
from montessori.generation.serve import Limits, make_server

MESSAGES = [{"role": "user", "content": "Write a poem."}]
LONG = 1800  # tokens: ~20 s on a loaded CPU core, far longer than any wait below


@pytest.fixture(scope="module")
def server(tiny_backend):
    """One server for the tests that leave it as they found it (idle)."""
    server = make_server(tiny_backend, "tiny", served_model_name="teacher", limits=Limits(body_timeout=1.0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


http = httpx.Client(timeout=60)  # one client: making one costs more than a tiny request


def chat(server, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(server.url + "/chat/completions", content=content,
                     headers={"Content-Type": "application/json"} | (headers or {}))


def health(server) -> dict:
    return http.get(server.url.removesuffix("/v1") + "/health").json()


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def raw_post(server, body: bytes, content_length: bytes | None = None) -> socket.socket:
    """A POST written by hand (a lying Content-Length, a client that hangs up)."""
    host, port = server.socket.getsockname()[:2]
    sock = socket.create_connection((host, port), timeout=10)
    length = content_length if content_length is not None else str(len(body)).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + length + b"\r\n\r\n" + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


MALFORMED = {
    "missing content": {"messages": [{"role": "user"}]},
    "missing role": {"messages": [{"content": "hi"}]},
    "unknown role": {"messages": [{"role": "robot", "content": "hi"}]},
    "no messages": {"messages": []},
    "messages not a list": {"messages": "hi"},
    "n=-3": {"messages": MESSAGES, "n": -3},
    "n=0": {"messages": MESSAGES, "n": 0},
    "n over the cap": {"messages": MESSAGES, "n": 1000},
    "n as a string": {"messages": MESSAGES, "n": "2"},
    "temperature=-1": {"messages": MESSAGES, "temperature": -1},
    "top_p=5": {"messages": MESSAGES, "top_p": 5},
    "top_p=0": {"messages": MESSAGES, "top_p": 0},
    "max_tokens=0": {"messages": MESSAGES, "max_tokens": 0},
    "max_tokens=1e6": {"messages": MESSAGES, "max_tokens": 1_000_000},
    "max_tokens a float": {"messages": MESSAGES, "max_tokens": 4.5},
    "seed=-1": {"messages": MESSAGES, "seed": -1},
    "stream": {"messages": MESSAGES, "stream": True},
    "content a number": {"messages": [{"role": "user", "content": 5}]},
    "a list body": [MESSAGES],
    "max_tokens 1e999": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}',
    "bad JSON": b'{"messages": [',
    "not UTF-8": b'{"messages": "\xff\xfe"}',
    "empty body": b"",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_every_malformed_request_gets_a_400_with_a_json_error(server, body):
    resp = chat(server, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"]
    assert health(server)["pending"] == 0


def test_max_tokens_is_capped_by_the_context_and_refused_at_once(server):
    start = time.monotonic()
    resp = chat(server, {"model": "tiny", "messages": MESSAGES, "max_tokens": 1_000_000})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert "2048" in resp.json()["error"]["message"] and time.monotonic() - start < 5
    ok = chat(server, {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "n": 2, "seed": 1})
    assert ok.status_code == 200
    data = ok.json()
    assert data["model"] == "tiny" and len(data["choices"]) == 2 and data["usage"]["completion_tokens"] == 6


def test_the_requested_model_is_checked(server):
    names = [m["id"] for m in http.get(server.url + "/models").json()["data"]]
    assert names == ["teacher", "tiny"]
    for name in names:
        resp = chat(server, {"model": name, "messages": MESSAGES, "max_tokens": 2})
        assert resp.status_code == 200 and resp.json()["model"] == name
    resp = chat(server, {"model": "runs/x/round-1/dpo/model", "messages": MESSAGES, "max_tokens": 2})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert "runs/x/round-1/dpo/model" in resp.json()["error"]["message"]


def test_a_lying_content_length_is_answered_not_hung(server):
    sock = raw_post(server, b'{"messages": []}', content_length=b"1000")  # 16 bytes sent, 1000 announced
    start = time.monotonic()
    status, body = read_response(sock)
    assert status == 408 and "Content-Length" in body["error"]["message"] and time.monotonic() - start < 5
    for bogus in (b"abc", b"-5"):
        status, body = read_response(raw_post(server, b"{}", content_length=bogus))
        assert status == 400 and "malformed" in body["error"]["message"]
    too_big = raw_post(server, b"{}", content_length=str(Limits().max_body_bytes + 1).encode())
    assert read_response(too_big)[0] == 413
    assert health(server)["status"] == "ok"


def test_a_full_queue_answers_503_at_once_and_bad_requests_never_wait(serve):
    server = serve(limits=Limits(max_pending=2))
    running = raw_post(server, json.dumps({"messages": MESSAGES, "max_tokens": LONG}).encode())
    assert wait_for(lambda: health(server)["running"] == 1, 10)
    waiting = raw_post(server, json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode())
    assert wait_for(lambda: health(server)["pending"] == 2, 10)
    start = time.monotonic()
    busy = chat(server, {"messages": MESSAGES, "max_tokens": 2})
    assert busy.status_code == 503 and busy.headers["Retry-After"] and busy.json()["error"]["code"] == "overloaded"
    assert chat(server, {"messages": MESSAGES, "n": -3}).status_code == 400  # parsed before any wait
    # Requests that can never succeed get their 4xx, not a 503 a client would retry forever (issue 26):
    # max_tokens over the context alone, max_tokens that fits only without the prompt, a model not served.
    for body, status, code in (({"messages": MESSAGES, "max_tokens": 1_000_000}, 400, "context_length_exceeded"),
                               ({"messages": MESSAGES, "max_tokens": 2047}, 400, "context_length_exceeded"),
                               ({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2}, 404, "model_not_found")):
        resp = chat(server, body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), resp.text
    message = chat(server, {"messages": MESSAGES, "max_tokens": 2047}).json()["error"]["message"]
    assert "prompt tokens do not fit" in message
    assert time.monotonic() - start < 5
    waiting.close()  # a waiting request that hangs up frees its place at once, not when it would have run
    # (seen in 0.2 s polls; 3 s was too short once, in CI on 2 cores shared with a DPO run: the running
    # generation, still running, is what shows the place was not freed by its end)
    assert wait_for(lambda: health(server)["pending"] == 1, 10) and health(server)["running"] == 1
    running.close()
    assert wait_for(lambda: health(server)["pending"] == 0, 5)


def test_generation_stops_when_the_client_hangs_up(server):
    sock = raw_post(server, json.dumps({"messages": MESSAGES, "max_tokens": LONG}).encode())
    assert wait_for(lambda: health(server)["running"] == 1, 10)
    sock.close()
    hung_up = time.monotonic()
    # The server notices within its 0.2 s poll and the model within one decoding step.
    assert wait_for(lambda: health(server)["running"] == 0, 5), "the generation went on after the hang-up"
    resp = chat(server, {"messages": MESSAGES, "max_tokens": 2})
    assert resp.status_code == 200 and time.monotonic() - hung_up < 6
    assert health(server)["pending"] == 0


def test_a_request_that_runs_out_of_time_gets_504_and_its_generation_stops(serve):
    server = serve(limits=Limits(request_timeout=1.0))
    start = time.monotonic()
    resp = chat(server, {"messages": MESSAGES, "max_tokens": LONG})
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout"
    assert time.monotonic() - start < 5 and health(server)["running"] == 0


def test_the_api_key_is_required_and_checked(serve):
    server = serve(api_key="right-key-123")
    body = {"messages": MESSAGES, "max_tokens": 2}
    for header in ("", "Bearer wrong-key-456", "Bearer right-key-12", "Bearer right-key-1234", "right-key-123"):
        resp = chat(server, body, {"Authorization": header})
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
        assert http.get(server.url + "/models", headers={"Authorization": header}).status_code == 401
    assert chat(server, body, {"Authorization": "Bearer right-key-123"}).status_code == 200


def test_unknown_routes_and_methods_get_json_errors(server):
    assert http.get(server.url + "/completions").json()["error"]["type"] == "not_found"
    resp = http.get(server.url + "/chat/completions")
    assert resp.status_code == 405 and resp.json()["error"]["message"]


# --- the client ------------------------------------------------------------------------------------

class OtherModelEndpoint(BaseHTTPRequestHandler):
    """A server that ignores the requested model, as the old `montessori serve` did."""

    def do_POST(self):
        json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        payload = json.dumps({"model": "some-other-model", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class EchoEndpoint(OtherModelEndpoint):
    """Answers as the model asked for, keeps connections open and records each request's client port."""
    protocol_version = "HTTP/1.1"
    peers: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        EchoEndpoint.peers.append(self.client_address)
        payload = json.dumps({"model": body["model"], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_the_client_refuses_another_models_answer():
    server = HTTPServer(("127.0.0.1", 0), OtherModelEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = HTTPBackend(f"http://127.0.0.1:{server.server_port}/v1", "teacher-after-dpo")
        with pytest.raises(InputError, match="asked for model 'teacher-after-dpo' but 'some-other-model' answered"):
            client.generate([Request(MESSAGES, seed=1)], Sampling(n=1, max_new_tokens=2))
        client.close()
    finally:
        server.shutdown()
        server.server_close()


def test_the_data_stage_teacher_is_asked_for_by_name_and_a_server_without_it_is_an_error(server, tiny_config):
    """With generation.backend=http the `data` stage asks for the DPO-updated teacher (a path in the
    run): a server serving another model must refuse, not answer with that model's text."""
    gen = tiny_config.generation
    gen.backend, gen.base_url = "http", server.url
    updated = "runs/tiny/round-1/dpo/model"
    client = make_backend(updated, gen, tiny_config.models)
    with pytest.raises(InputError, match=f"404.*no model '{updated}'"):
        client.generate([Request(MESSAGES, seed=1)], Sampling(n=1, max_new_tokens=2))
    assert client.retries == 0
    served = make_backend("tiny", gen, tiny_config.models)
    assert len(served.generate([Request(MESSAGES, seed=1)], Sampling(n=1, max_new_tokens=2))[0]) == 1
    served.close()


def test_the_client_retries_connection_errors_then_gives_up():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = HTTPBackend(f"http://127.0.0.1:{port}/v1", "tiny", max_retries=2, backoff=0.01)
    with pytest.raises(MontessoriError, match="3 attempt.*is the server running"):
        client.generate([Request(MESSAGES, seed=1)], Sampling(n=1, max_new_tokens=2))
    assert client.retries == 2


def test_the_client_reuses_its_connection():
    server = HTTPServer(("127.0.0.1", 0), EchoEndpoint)
    EchoEndpoint.peers = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = HTTPBackend(f"http://127.0.0.1:{server.server_port}/v1", "tiny", concurrency=1)
        for seed in range(3):
            client.generate([Request(MESSAGES, seed=seed)], Sampling(n=1, max_new_tokens=2))
        client.close()
    finally:
        server.shutdown()
        server.server_close()
    assert len(EchoEndpoint.peers) == 3 and len(set(EchoEndpoint.peers)) == 1  # one client port: one connection


# --- the command -----------------------------------------------------------------------------------

def start_cli(tiny_spec, *extra) -> tuple[subprocess.Popen, str]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "montessori.cli", "serve", tiny_spec, "--port", "0",
                             "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stdout.readline()
    assert "serving" in line, line + proc.stderr.read()
    return proc, line.split(" at ")[1].split()[0]


def test_load_every_request_gets_an_http_answer_and_the_server_stays_up(server):
    """200 requests, 50 at a time, each on a fresh connection: valid, malformed and huge ones."""
    url = server.url
    valid = {"model": "teacher", "messages": MESSAGES, "max_tokens": 2}
    kinds = [(json.dumps(valid).encode(), {200, 503}),
             (json.dumps({"messages": [{"role": "user"}]}).encode(), {400}),
             (json.dumps({"messages": MESSAGES, "n": -3}).encode(), {400}),
             (json.dumps({"messages": MESSAGES, "max_tokens": 1_000_000}).encode(), {400}),  # never admitted
             (json.dumps({"messages": MESSAGES, "max_tokens": 2047}).encode(), {400}),  # not with the prompt
             (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}', {400}),
             (b'{"messages": [', {400}),
             (json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode(), {404}),
             (json.dumps({"messages": MESSAGES, "temperature": -1, "top_p": 5}).encode(), {400})]

    async def hammer():
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            async def one(i):
                body, expected = kinds[i % len(kinds)]
                resp = await client.post(url + "/chat/completions", content=body,
                                         headers={"Content-Type": "application/json"})
                assert resp.status_code in expected, (i, resp.status_code, resp.text)
                assert ("choices" if resp.status_code == 200 else "error") in resp.json()
                return resp.status_code
            return await asyncio.gather(*(one(i) for i in range(200)))

    statuses = asyncio.run(hammer())  # a reset connection or a timeout raises here
    assert len(statuses) == 200 and 200 in statuses
    assert health(server) == {"status": "ok", "model": "teacher", "running": 0, "pending": 0}
    assert chat(server, valid).status_code == 200


def test_the_command_serves_and_ctrl_c_stops_it_with_a_serve_message(tiny_spec):
    proc, url = start_cli(tiny_spec, "--served-model-name", "teacher", "--max-pending", "2")
    resp = http.post(url + "/chat/completions", json={"model": "teacher", "messages": MESSAGES, "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["model"] == "teacher"
    assert http.post(url + "/chat/completions", json={"model": "x", "messages": MESSAGES}).status_code == 404
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "serve: stopped" in err
    assert "resume" not in err and "Traceback" not in err
