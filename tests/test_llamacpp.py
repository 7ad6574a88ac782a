"""The llama.cpp backend on the embedded SmolLM2-135M GGUF (98 MB, a real model): seeds, limits, samples,
the chat template, sampling that means what hf.py means, and the `instructions` stage on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# The backend's module first: it sets OMP_WAIT_POLICY, which libgomp reads when llama_cpp loads it.
import montessori.generation.backends.llamacpp  # noqa: E402,F401

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'montessori[cpu]')")

from montessori.config import load_preset  # noqa: E402
from montessori.generation.backends import choose_backend, make_backend  # noqa: E402
from montessori.generation.backends.base import Request, Sampling  # noqa: E402
from montessori.generation.backends.hf import _top_p  # noqa: E402
from montessori.generation.backends.llamacpp import LlamaCppBackend, _Row, sample_token, top_p_tokens  # noqa: E402
from montessori.models.chat import prompt_text  # noqa: E402

ASK = [{"role": "user", "content": "Write one short instruction for a lathe operator."}]
OTHER = [{"role": "system", "content": "You write tasks."},
         {"role": "user", "content": "Name a tool used to measure a bore."}]


@pytest.fixture(scope="module")
def backend():
    b = LlamaCppBackend.load("smollm2", threads=2, parallel=4)
    yield b
    b.close()


def texts(completions):
    return [[c.text for c in row] for row in completions]


def test_same_seed_same_text_other_seed_other_text(backend):
    sampling = Sampling(n=1, temperature=1.0, top_p=0.9, max_new_tokens=24)
    first = texts(backend.generate([Request(ASK, seed=1), Request(OTHER, seed=2)], sampling))
    again = texts(backend.generate([Request(ASK, seed=1), Request(OTHER, seed=2)], sampling))
    other = texts(backend.generate([Request(ASK, seed=7), Request(OTHER, seed=8)], sampling))
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]
    assert all(t.strip() for row in first for t in row)


def test_max_new_tokens_and_n_samples(backend):
    sampling = Sampling(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6)
    out = backend.generate([Request(ASK, seed=3), Request(OTHER, seed=4)], sampling)
    assert [len(row) for row in out] == [3, 3]
    for row in out:
        assert all(1 <= c.tokens <= 6 for c in row)
        assert all(c.tokens == 6 for c in row if c.finish_reason == "length")
        assert len({c.text for c in row}) > 1  # each sample draws from its own generator
    long = backend.generate([Request(ASK, seed=3)], Sampling(n=1, temperature=0.0, max_new_tokens=200))[0][0]
    assert long.finish_reason == "stop" and long.tokens < 200  # greedy SmolLM2 ends its turn


def test_the_prompt_is_the_chat_template_transformers_renders(backend, monkeypatch):
    from montessori.models.load import load_tokenizer
    tokenizer = load_tokenizer("smollm2")
    seen = []
    tokenize = backend.tokenize
    monkeypatch.setattr(backend, "tokenize", lambda text: seen.append(text) or tokenize(text))
    backend.generate([Request(OTHER, prefill="1. ", seed=0)], Sampling(n=1, max_new_tokens=2))
    assert seen == [prompt_text(tokenizer, OTHER, "1. ")]
    assert seen[0].startswith("<|im_start|>system\nYou write tasks.<|im_end|>\n")
    # The same token ids as the stages encode it (special tokens parsed, no BOS added).
    assert backend.tokenize(seen[0]) == tokenizer(seen[0], add_special_tokens=False)["input_ids"]


def test_a_samples_text_does_not_depend_on_the_others_in_its_call(backend):
    """Slots are refilled as rows end; a request's draws come from its own seed."""
    sampling = Sampling(n=2, temperature=1.0, top_p=0.9, max_new_tokens=16)
    alone = texts(backend.generate([Request(OTHER, seed=5)], sampling))[0]
    crowd = texts(backend.generate([Request(ASK, seed=1), Request(ASK, seed=2), Request(OTHER, seed=5),
                                    Request(ASK, seed=3)], sampling))
    assert crowd[2] == alone


def test_the_thread_count_does_not_change_the_text(backend):
    """generation.threads is not fingerprinted: how many threads compute a step must not change it."""
    one = LlamaCppBackend.load("smollm2", threads=1, parallel=4)
    sampling = Sampling(n=2, temperature=1.0, top_p=0.9, max_new_tokens=16)
    requests = [Request(ASK, seed=11), Request(OTHER, seed=12)]
    assert texts(one.generate(requests, sampling)) == texts(backend.generate(requests, sampling))
    one.close()


def _row(vocab, prompt=(), generated=()):
    seen = np.zeros(vocab, dtype=bool)
    seen[list(prompt) + list(generated)] = True
    gen = np.zeros(vocab, dtype=bool)
    gen[list(generated)] = True
    return _Row(0, 0, 0, np.random.default_rng(0), seen, gen, list(generated))


def test_penalties_mean_what_transformers_and_openai_mean():
    logits = np.array([3.0, -2.0, 1.0, 2.9], dtype=np.float32)
    greedy = Sampling(temperature=0.0, presence_penalty=0.0, repetition_penalty=1.0)
    assert sample_token(logits, _row(4), greedy) == 0
    # Presence penalty: generated tokens only (the prompt's token 0 is not penalized by it).
    presence = Sampling(temperature=0.0, presence_penalty=0.5)
    assert sample_token(logits, _row(4, prompt=[0]), presence) == 0
    assert sample_token(logits, _row(4, generated=[0]), presence) == 3
    # Repetition penalty: prompt and generated, 3.0 / 2 < 2.9 (transformers divides a positive logit).
    repetition = Sampling(temperature=0.0, presence_penalty=0.0, repetition_penalty=2.0)
    assert sample_token(logits, _row(4, prompt=[0]), repetition) == 3


def test_top_p_keeps_what_hf_keeps():
    rng = np.random.default_rng(0)
    for top_p, scale in ((0.9, 3.0), (0.5, 1.0), (0.99, 0.1), (0.3, 8.0)):
        logits = (rng.standard_normal(1000) * scale).astype(np.float32)
        ours = set(top_p_tokens(logits, top_p).tolist())
        theirs = torch.isfinite(_top_p(torch.tensor(logits)[None], top_p))[0].nonzero().flatten().tolist()
        assert ours == set(theirs)


def test_auto_picks_llamacpp_for_a_gguf_teacher_on_the_cpu(tiny_config):
    gen, models = tiny_config.generation, tiny_config.models
    gen.backend, models.device = "auto", "cpu"
    assert choose_backend(gen, "smollm2", models) == "llamacpp"
    assert choose_backend(gen, "qwen2.5-coder-1.5b", models) == "llamacpp"
    assert choose_backend(gen, "tiny-random:0", models) == "transformers"
    gen.backend = "llamacpp"  # the DPO-updated teacher is an HF directory: transformers serves it
    assert choose_backend(gen, "runs/x/round-1/dpo/model", models) == "transformers"
    assert make_backend("smollm2", gen, models).name == "llamacpp"


def test_the_instructions_stage_runs_on_llamacpp(tmp_path):
    from montessori.pipeline import run_pipeline
    config = load_preset("tiny", ["models.teacher=smollm2", "models.device=cpu", "generation.backend=llamacpp",
                                  "generation.num_prompts=2", "generation.batch_size=8",
                                  "generation.instructions.max_new_tokens=24"])
    run_pipeline(config, tmp_path, until="instructions", progress=False)
    stage = tmp_path / "round-1" / "instructions"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["backend"] == "llamacpp" and manifest["teacher"] == "smollm2"
    counts = manifest["counts"]
    assert counts["prompts"] == 2 and counts["samples"] == 8 and counts["tokens"] > 0
    lines = [json.loads(x) for f in ("candidates.jsonl", "dropped.jsonl")
             for x in (stage / f).read_text().splitlines()]
    assert len(lines) == 8 and any(c["completion"].strip() for c in lines)
