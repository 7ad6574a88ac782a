"""The OpenAI-compatible HTTP backend against a real server on loopback (`montessori serve`)."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from montessori.errors import MontessoriError
from montessori.generation.backends.base import Request, Sampling
from montessori.generation.backends.http import HTTPBackend
from montessori.generation.stage import generate_instructions
from montessori.store import read_jsonl

KEY_ENV = "MONTESSORI_TEST_API_KEY"
SAMPLING = Sampling(n=2, temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=8)
REQUESTS = [Request([{"role": "user", "content": "Write a poem."}], seed=1),
            Request([{"role": "user", "content": "List fruits."}], "1.", seed=2)]


def test_http_backend_matches_the_tiny_backend(serve, tiny_backend, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = serve()
    client = HTTPBackend(server.url, "tiny", api_key_env=KEY_ENV, concurrency=2)
    remote = client.generate(REQUESTS, SAMPLING)
    local = [tiny_backend.generate([r], SAMPLING)[0] for r in REQUESTS]
    # Same seeds, same sampling semantics: the served text is the in-process text (prefill included).
    assert [[c.text for c in cs] for cs in remote] == [[c.text for c in cs] for cs in local]
    assert all(c.tokens == 8 and c.finish_reason == "length" for cs in remote for c in cs)
    assert client.retries == 0 and server.requests == 2


def test_retry_after_simulated_503(serve, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = serve(fail_first=1)
    client = HTTPBackend(server.url, "tiny", api_key_env=KEY_ENV, backoff=0.01)
    out = client.generate(REQUESTS[:1], SAMPLING)
    assert len(out[0]) == 2 and client.retries == 1 and server.requests == 2


def test_gives_up_after_max_retries(serve, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = serve(fail_first=10)
    client = HTTPBackend(server.url, "tiny", api_key_env=KEY_ENV, max_retries=2, backoff=0.01)
    with pytest.raises(MontessoriError, match="HTTP 503.*3 attempt"):
        client.generate(REQUESTS[:1], SAMPLING)


def test_wrong_or_missing_api_key_is_a_clear_error(serve, monkeypatch, caplog):
    server = serve(api_key="right-key-123")
    client = HTTPBackend(server.url, "tiny", api_key_env=KEY_ENV, backoff=0.01)
    monkeypatch.setenv(KEY_ENV, "wrong-key-456")
    with pytest.raises(MontessoriError) as err:
        client.generate(REQUESTS[:1], SAMPLING)
    message = str(err.value)
    assert "401" in message and KEY_ENV in message and "refused" in message
    assert "wrong-key-456" not in message and "wrong-key-456" not in caplog.text
    assert client.retries == 0  # an auth error is not retried
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MontessoriError, match=f"{KEY_ENV} is not set"):
        client.generate(REQUESTS[:1], SAMPLING)
    monkeypatch.setenv(KEY_ENV, "right-key-123")
    assert len(client.generate(REQUESTS[:1], SAMPLING)[0]) == 2


def test_instruction_stage_over_http(serve, tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = serve()
    client = HTTPBackend(server.url, "tiny", api_key_env=KEY_ENV)
    gen = tiny_config.generation
    gen.instructions.max_new_tokens = 8
    seeds = [(f"s{i}", f"Seed instruction {i}.") for i in range(10)]
    counts = generate_instructions(client, gen, seeds, tmp_path, round=1, prefix="r1", seed=0, num_prompts=2)
    assert counts.samples == 8 and counts.tokens == 8 * 8
    prompts = read_jsonl(tmp_path / "prompts.jsonl")
    assert all(p["prefill"] == "9." for p in prompts)


def test_montessori_serve_command(tiny_spec, tmp_path):
    env = os.environ | {KEY_ENV: "k1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "montessori.cli", "serve", tiny_spec, "--port", "0",
                             "--device", "cpu", "--api-key-env", KEY_ENV],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line
        url = line.split(" at ")[1].split()[0]
        req = urllib.request.Request(url + "/models", headers={"Authorization": "Bearer k1"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == tiny_spec
        os.environ[KEY_ENV] = "k1"
        try:
            out = HTTPBackend(url, tiny_spec, api_key_env=KEY_ENV).generate(REQUESTS[:1], SAMPLING)
        finally:
            del os.environ[KEY_ENV]
        assert len(out[0]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_vllm_backend():
    from montessori.generation.backends import vllm
    if not vllm.available():
        pytest.skip("vLLM is not installed or no CUDA device (it cannot be installed on the CPU machines)")
    backend = vllm.VLLMBackend("tiny-random:0")
    out = backend.generate(REQUESTS, SAMPLING)
    assert len(out) == 2 and all(len(cs) == 2 for cs in out)
