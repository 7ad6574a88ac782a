"""HTTP judge against a local OpenAI-compatible endpoint (a tiny stdlib server, no network)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from montessori.evaluation.judge import HTTPJudge
from montessori.evaluation.winrate import judge_pairs, win_rate
from montessori.evaluation.answers import Conversation


class Endpoint(BaseHTTPRequestHandler):
    """Answers like a judge that prefers the answer mentioning 'good'; fails the first request (503)."""
    seen: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Endpoint.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if len(Endpoint.seen) == 1:
            self.send_response(503)
            self.end_headers()
            return
        prompt = body["messages"][-1]["content"]
        if "Rating" in prompt:
            text = "The answer is fine. Rating: [[7]]"
        else:
            a = prompt.split("## Output (A)")[1].split("## Output (B)")[0]
            text = "Output (A)" if "good" in a else "Output (B)"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Endpoint.seen = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_http_judge_parses_verdicts_retries_and_swaps_positions(endpoint, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    judge = HTTPJudge(endpoint, "judge-model", api_key_env="JUDGE_KEY", max_retries=2)
    convs = [Conversation(f"p{i}", [f"q{i}"]) for i in range(4)]
    a = {c.id: ["a good answer"] for c in convs}
    b = {c.id: ["an answer"] for c in convs}
    result = win_rate(judge_pairs(judge, convs, a, b), samples=50)
    assert result["win_rate"] == 100.0 and result["first_position_rate"] == 0.5
    assert judge.grade("q", "a") == 7.0
    first = Endpoint.seen[1]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0.0
    assert len(Endpoint.seen) == 1 + 8 + 1  # the 503, both orders of 4 pairs, one grade
