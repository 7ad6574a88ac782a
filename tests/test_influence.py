"""The influence engine against the obvious method, on a tiny random Llama after a real warm-up.

The obvious method: deep-copy model and torch.optim.AdamW (loaded with the warm-up state), take the
real optimizer step on the candidate, evaluate the reference set one example at a time with the
model's full logits. The engine must agree, never leak state between candidates, not depend on the
evaluation batch size, and leave the warm-up state bit for bit as saved.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from montessori.config import WarmupConfig
from montessori.influence import compute_influence, load_warmup, save_warmup, train_warmup
from montessori.models.batching import encode_pairs
from montessori.influence.metrics import spearman
from montessori.records import Pair

TOPICS = ["the moon", "tea", "rivers", "prime numbers", "bicycles", "autumn", "bread", "glaciers", "chess",
          "violins", "deserts", "owls", "copper", "the alphabet", "volcanoes", "honey", "clocks", "sailing",
          "ants", "mirrors", "paper", "thunder", "rice", "bridges", "salt", "maps of stars", "snow", "coffee"]


def make_pairs(prefix: str, start: int, n: int) -> list[Pair]:
    out = []
    for i in range(start, start + n):
        topic = TOPICS[i % len(TOPICS)]
        response = " ".join([f"Here is a fact about {topic}."] + [f"Point {k}: {topic} matter." for k in range(i % 4)])
        out.append(Pair(f"{prefix}{i}", f"Tell me about {topic} in {i % 3 + 1} sentences.", response))
    return out


WARM, CANDIDATES, REFERENCE = make_pairs("w", 0, 6), make_pairs("c", 6, 10), make_pairs("r", 16, 9)


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory, tiny_spec):
    """A real warm-up (6 AdamW steps, lr 1e-3) saved in the documented layout."""
    from montessori.models import load_model
    model, tokenizer = load_model(tiny_spec, device="cpu", dtype="float32")
    optimizer, _ = train_warmup(model, encode_pairs(tokenizer, WARM, 128), WarmupConfig(lr=1e-3),
                                pad_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("warmup")
    save_warmup(folder, model, tokenizer, optimizer)
    return folder


def naive_loss_sum(model, tokenizer, pair: Pair) -> tuple[float, int]:
    ids, labels = encode_pairs(tokenizer, [pair], 128)[0].input_ids, encode_pairs(tokenizer, [pair], 128)[0].labels
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    target = torch.tensor(labels[1:])
    keep = target != -100
    return float(F.cross_entropy(logits[keep], target[keep], reduction="sum")), int(keep.sum())


def naive_reference_loss(model, tokenizer) -> float:
    with torch.no_grad():
        sums = [naive_loss_sum(model, tokenizer, p) for p in REFERENCE]
    return sum(s for s, _ in sums) / sum(n for _, n in sums)


def obvious_influence(model, tokenizer, state: dict, pair: Pair) -> float:
    model, state = copy.deepcopy(model), copy.deepcopy(state)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    optimizer.load_state_dict(state)
    before = naive_reference_loss(model, tokenizer)
    e = encode_pairs(tokenizer, [pair], 128)[0]
    loss = model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss  # HF's own token mean
    loss.backward()
    optimizer.step()
    return before - naive_reference_loss(model, tokenizer)


def influences(results) -> list[float]:
    assert all(r.status == "ok" for r in results), [r.status for r in results]
    return [r.influence for r in results]


def test_exact_equals_deepcopy_and_real_adamw_step(warm_dir):
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    assert int(state["state"][0]["step"]) == 6
    engine = influences(compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer, estimator="exact"))
    obvious = [obvious_influence(model, tokenizer, state, c) for c in CANDIDATES]
    assert len(engine) == len(CANDIDATES)  # one value per candidate, none dropped
    # influences are ~1e-1; fp32 sums of ~10-nat losses agree to ~1e-6
    assert engine == pytest.approx(obvious, abs=2e-5, rel=1e-4)
    assert len(set(round(x, 5) for x in engine)) > 1  # the candidates really differ


def test_value_does_not_depend_on_order_or_company(warm_dir):
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    target, others = CANDIDATES[3], CANDIDATES[:3] + CANDIDATES[4:8]
    alone = compute_influence(model, state, [target], REFERENCE, tokenizer=tokenizer, estimator="exact")[0].influence
    first = compute_influence(model, state, [target] + others, REFERENCE, tokenizer=tokenizer,
                              estimator="exact")[0].influence
    last = compute_influence(model, state, others + [target], REFERENCE, tokenizer=tokenizer,
                             estimator="exact")[-1].influence
    twice = compute_influence(model, state, [target, target], REFERENCE, tokenizer=tokenizer, estimator="exact")
    assert alone == first == last == twice[0].influence == twice[1].influence


@pytest.mark.parametrize("estimator", ["exact", "linear"])
def test_value_does_not_depend_on_eval_batch_size(warm_dir, estimator):
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    runs = [compute_influence(model, state, CANDIDATES[:4], REFERENCE, tokenizer=tokenizer, estimator=estimator,
                              eval_batch_size=bs) for bs in (1, 4, 16)]
    for other in runs[1:]:
        assert other[0].ref_loss_before == pytest.approx(runs[0][0].ref_loss_before, rel=1e-6)
        assert influences(other) == pytest.approx(influences(runs[0]), abs=2e-5, rel=1e-4)


def test_warmup_state_in_memory_is_bit_for_bit_the_saved_one(warm_dir):
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    for estimator in ("exact", "linear"):
        compute_influence(model, state, CANDIDATES[:3], REFERENCE, tokenizer=tokenizer, estimator=estimator)
    saved_model, _, saved_state = load_warmup(warm_dir, "cpu")
    for (name, p), q in zip(model.named_parameters(), saved_model.parameters()):
        assert torch.equal(p, q), name
        assert p.grad is None, name
    for key, s in saved_state["state"].items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["state"][key][field], s[field]), (key, field)


def test_linear_ranks_candidates_like_exact(warm_dir):
    # The first-order error grows with the step: the tiny warm-up's lr 1e-3 moves weights ~5% per step
    # (linear/exact ~1.1, Spearman 0.85); the probing step at 1e-4 (still 10x the paper's relative
    # step) gives ratios ~1.01 and the same order.
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    exact = influences(compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                                         estimator="exact", lr=1e-4))
    linear_results = compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer, lr=1e-4,
                                       estimator="linear")
    linear = influences(linear_results)
    assert all(r.estimator == "linear" and r.ref_loss_after is None for r in linear_results)
    assert spearman(linear, exact) >= 0.95
    assert linear == pytest.approx(exact, rel=0.05)  # first order: close, not equal
    assert linear != pytest.approx(exact, rel=1e-6)


def test_invalid_candidates_are_recorded_and_the_run_goes_on(warm_dir):
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    long_prompt = Pair("long", "word " * 400, "short answer")  # prompt fills max_length: no response token
    results = compute_influence(model, state, [long_prompt] + CANDIDATES[:2], REFERENCE, tokenizer=tokenizer,
                                estimator="exact", max_length=128)
    assert [r.status for r in results] == ["empty_response", "ok", "ok"]
    assert results[0].influence is None
    exploded = compute_influence(model, state, CANDIDATES[:2], REFERENCE, tokenizer=tokenizer,
                                 estimator="exact", lr=float("inf"))
    assert [r.status for r in exploded] == ["non_finite_loss"] * 2
    again = compute_influence(model, state, CANDIDATES[:2], REFERENCE, tokenizer=tokenizer, estimator="exact")
    assert influences(again) == influences(results[1:])  # the exploding step left no trace


def test_bf16_precision_runs_and_moves_values(warm_dir):
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    fp32 = influences(compute_influence(model, state, CANDIDATES[:3], REFERENCE, tokenizer=tokenizer,
                                        estimator="exact"))
    bf16 = influences(compute_influence(model, state, CANDIDATES[:3], REFERENCE, tokenizer=tokenizer, estimator="exact",
                                        precision="bfloat16", grad_precision="bfloat16"))
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=0.05)


def assert_state_is_saved_one(model, state, warm_dir):
    saved_model, _, saved_state = load_warmup(warm_dir, "cpu")
    for (name, p), q in zip(model.named_parameters(), saved_model.parameters()):
        assert torch.equal(p, q), name
    for key, s in saved_state["state"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state["state"][key][field], s[field]), (key, field)


def test_host_shadow_and_gradient_buckets_give_the_same_values(warm_dir, monkeypatch):
    """shadow="host" (the 8B layout: θ stepped in place, restored from a host copy) and per-parameter
    buckets give the values of the default layout, and leave the state bit for bit as saved."""
    import montessori.influence.engine as engine_module
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    device = influences(compute_influence(model, state, CANDIDATES[:4], REFERENCE, tokenizer=tokenizer,
                                          estimator="exact", shadow="device"))
    host = influences(compute_influence(model, state, CANDIDATES[:4], REFERENCE, tokenizer=tokenizer, estimator="exact",
                                        shadow="host"))
    monkeypatch.setattr(engine_module, "BUCKET_BYTES", 1)  # one flush per parameter
    small = influences(compute_influence(model, state, CANDIDATES[:4], REFERENCE, tokenizer=tokenizer,
                                         estimator="exact", shadow="host"))
    exploded = compute_influence(model, state, CANDIDATES[:1], REFERENCE, tokenizer=tokenizer,
                                 estimator="exact", shadow="host",
                                 lr=float("inf"))
    assert host == device and small == pytest.approx(device, abs=1e-7)
    assert exploded[0].status == "non_finite_loss"
    assert_state_is_saved_one(model, state, warm_dir)


def test_bf16_reference_gradient_keeps_the_ranking(warm_dir):
    """ref_grad_dtype="bfloat16" (∇L_ref accumulated in fp32, stored in bf16: the 8B layout) changes the
    linear values by bf16 rounding only."""
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    fp32 = influences(compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                                        estimator="linear", ref_grad_dtype="float32"))
    bf16 = influences(compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                                        estimator="linear", ref_grad_dtype="bfloat16"))
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=1e-2)
    assert spearman(bf16, fp32) >= 0.95


def test_weight_decay_is_part_of_the_step(warm_dir):
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    state = copy.deepcopy(state)
    state["param_groups"][0].update(weight_decay=20.0, lr=1e-4)  # lr·wd = 2e-3: a sizeable share of Δ
    exact = influences(compute_influence(model, state, CANDIDATES[:2], REFERENCE, tokenizer=tokenizer,
                                         estimator="exact"))
    obvious = [obvious_influence(model, tokenizer, state, c) for c in CANDIDATES[:2]]
    linear = influences(compute_influence(model, state, CANDIDATES[:2], REFERENCE, tokenizer=tokenizer,
                                          estimator="linear"))
    assert exact == pytest.approx(obvious, abs=2e-5, rel=1e-4)
    assert linear == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("pad_multiple", [1, 64])
def test_flat_linear_step_gives_the_eager_values(warm_dir, pad_multiple):
    """linear_kernel="flat" (fast.py: each parameter's gradient consumed by a fused update
    as backward completes it, candidate right-padded to a multiple of pad_multiple tokens: the
    CUDA-graph path without the graph) = the eager bucketed step, and it gives the student back
    untouched (weights, moments, no .grad, no hook left on it)."""
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    hooks = influences(compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                                         estimator="linear", linear_kernel="hooks"))
    flat = influences(compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                                        estimator="linear", linear_kernel="flat", pad_multiple=pad_multiple))
    assert flat == pytest.approx(hooks, rel=1e-5, abs=1e-9)
    for p in model.parameters():
        assert p.grad is None and not getattr(p, "_post_accumulate_grad_hooks", None)
    assert_state_is_saved_one(model, state, warm_dir)


def test_pipelined_scoring_gives_each_candidate_its_own_value_in_order(warm_dir):
    """score_many on the fast path queues candidate k+1 before it reads candidate k's value (both
    use the same input buffers and output scalar): every result equals scoring that candidate
    alone, in the input order, an empty-response candidate included where it stands."""
    from montessori.influence.engine import AdamWState, InfluenceEngine
    from montessori.models.batching import Example
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    state = AdamWState.from_state_dict(state, list(model.parameters()))
    engine = InfluenceEngine(model, state, encode_pairs(tokenizer, REFERENCE, 128), pad_id=tokenizer.pad_token_id,
                             estimator="linear", linear_kernel="flat")
    examples = encode_pairs(tokenizer, CANDIDATES[:4], 128)
    empty = Example("empty", examples[0].input_ids, [-100] * len(examples[0].input_ids))
    examples = examples[:2] + [empty] + examples[2:]
    try:
        alone = [engine.score(e) for e in reversed(examples)][::-1]
        piped = list(engine.score_many(examples))
    finally:
        engine.close()
    assert [r.id for r in piped] == [e.id for e in examples]
    assert [r.status for r in piped] == [r.status for r in alone] == ["ok", "ok", "empty_response", "ok", "ok"]
    values = [r.influence for r in piped]
    assert values == [r.influence for r in alone]
    assert values[2] is None and len(set(values)) == 5  # distinct: no result read another's scalar


def test_fused_update_pass_summed_by_rows_is_the_plain_dot():
    """fast.adam_dot_rows (the form compiled on CUDA: per-row sums of ROW elements, then their sum)
    = adam_dot, the AdamW update's dot with ∇L_ref in one sum (the tiny model's norm weights, 64
    elements, take adam_dot itself: the flat tests cover that split)."""
    from montessori.influence.fast import ROW, adam_dot, adam_dot_rows
    gen = torch.Generator().manual_seed(0)
    n = ROW * 37
    r, m = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-4
    g, v = torch.randn(n, generator=gen).bfloat16(), torch.randn(n, generator=gen).square() * 1e-6
    consts = (0.9, 0.999, (1 - 0.999 ** 1001) ** 0.5, 1e-8)
    plain = adam_dot(r, g, m, v, *consts)
    rows = (t.view(-1, ROW) for t in (r, g, m, v))  # as FastLinear._consume passes them
    assert float(adam_dot_rows(*rows, *consts)) == pytest.approx(float(plain), rel=1e-5)


def test_auto_linear_kernel_is_graphed_on_cuda_only():
    from montessori.influence.engine import resolve_linear_kernel
    assert resolve_linear_kernel("auto", torch.device("cuda")) == "graphed"
    assert resolve_linear_kernel("auto", torch.device("cpu")) == "hooks"
    assert resolve_linear_kernel("flat", torch.device("cuda")) == "flat"
    with pytest.raises(ValueError, match="linear_kernel"):
        resolve_linear_kernel("gpu", torch.device("cpu"))


def test_flat_linear_step_in_bf16_uses_a_bf16_copy(warm_dir, monkeypatch):
    """grad_precision=bf16 on the flat path: the candidate gradient of a bf16 copy of the student (the
    cast autocast makes on every forward, made once), close to the autocast step; with the fp32 weights
    offloaded meanwhile (the 8B layout), they come back bit for bit."""
    import montessori.influence.engine as engine_module
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    autocast = influences(compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                                            estimator="linear", grad_precision="bfloat16", linear_kernel="hooks"))
    monkeypatch.setattr(engine_module, "fits_device", lambda params, size: False)  # offload θ meanwhile
    flat = influences(compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                                        estimator="linear", grad_precision="bfloat16", linear_kernel="flat"))
    assert flat != autocast and flat == pytest.approx(autocast, rel=0.05)
    assert spearman(flat, autocast) >= 0.9
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_state_is_saved_one(model, state, warm_dir)


def test_fast_step_attention_is_math_only_and_the_bf16_copy_allows_tf32(warm_dir):
    """The fast path's forward runs with SDPA restricted to the math backend (deterministic: cuDNN
    attention in the CUDA graphs was not) and, for the bf16 copy, tf32 allowed (only the math
    attention's fp32 matmuls see it); both flags are restored after the step."""
    from montessori.influence.engine import AdamWState, InfluenceEngine
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    state = AdamWState.from_state_dict(state, list(model.parameters()))
    engine = InfluenceEngine(model, state, encode_pairs(tokenizer, REFERENCE, 128), pad_id=tokenizer.pad_token_id,
                             estimator="linear", grad_precision="bfloat16", linear_kernel="flat")
    seen = []
    b = torch.backends.cuda
    flags = lambda: (b.math_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(),  # noqa: E731
                     b.cudnn_sdp_enabled(), b.matmul.allow_tf32)
    handle = engine.fast.student.base_model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(flags()))
    before = flags()
    try:
        engine.score(encode_pairs(tokenizer, CANDIDATES[:1], 128)[0])
    finally:
        handle.remove()
        engine.close()
    assert seen == [(True, False, False, False, True)]
    assert flags() == before


def test_compile_on_the_flat_path_compiles_the_copys_layers(warm_dir):
    """influence.compile on the fast path compiles each decoder layer of the copy that takes the
    candidate gradient (regional compilation; compiled on first call; the slow test below runs it),
    never the student's."""
    from montessori.influence.engine import AdamWState, InfluenceEngine
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    state = AdamWState.from_state_dict(state, list(model.parameters()))
    engine = InfluenceEngine(model, state, encode_pairs(tokenizer, REFERENCE, 128), pad_id=tokenizer.pad_token_id,
                             estimator="linear", grad_precision="bfloat16", linear_kernel="flat", compile="on")
    try:
        layers = engine.fast.student.base_model.layers
        assert engine.fast.compiled == list(layers) and layers[0] is not model.base_model.layers[0]
        assert all(layer._compiled_call_impl is not None for layer in layers)
        assert all(layer._compiled_call_impl is None for layer in model.base_model.layers)
    finally:
        engine.close()
    # compile="auto" (the default) compiles only the graphed step on CUDA: the flat step stays eager
    engine = InfluenceEngine(model, state, encode_pairs(tokenizer, REFERENCE, 128), pad_id=tokenizer.pad_token_id,
                             estimator="linear", grad_precision="bfloat16", linear_kernel="flat")
    try:
        assert engine.fast.compiled == [] and engine.fast.forward is engine.fast.student.base_model
    finally:
        engine.close()
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


def test_a_failing_fast_path_gives_the_student_its_weights_back(warm_dir, monkeypatch):
    """If the engine cannot be built after the fast path moved θ to the host (the 8B layout), the
    caller's model keeps its weights, bit for bit, and no hook stays on it."""
    import montessori.influence.engine as engine_module
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    monkeypatch.setattr(engine_module, "fits_device", lambda params, size: False)  # θ offloaded first

    def no_inductor(module, *args, **kwargs):
        raise RuntimeError("inductor is not available")
    monkeypatch.setattr(torch.nn.Module, "compile", no_inductor)  # fails after the offload: the copy's layers
    with pytest.raises(RuntimeError, match="inductor"):
        compute_influence(model, state, CANDIDATES[:1], REFERENCE, tokenizer=tokenizer, estimator="linear",
                          grad_precision="bfloat16", linear_kernel="flat", compile="on")
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    assert_state_is_saved_one(model, state, warm_dir)


@pytest.mark.slow  # inductor compiles C++ kernels on CPU: ~1-2 minutes
def test_compiled_flat_step_gives_the_eager_values(warm_dir):
    """compile="on" on the flat path with a bf16 copy, after the student was compiled in place (as the
    stage does): the copy's forward, compiled with dynamic shapes, gives the eager copy's values and
    leaves no gradient or hook on the student."""
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    eager = influences(compute_influence(model, state, CANDIDATES[:4], REFERENCE, tokenizer=tokenizer,
                                         estimator="linear", grad_precision="bfloat16", linear_kernel="flat"))
    model.base_model.compile(dynamic=True)
    compiled = influences(compute_influence(model, state, CANDIDATES[:4], REFERENCE, tokenizer=tokenizer,
                                            estimator="linear", grad_precision="bfloat16", linear_kernel="flat",
                                            compile="on"))
    assert compiled == pytest.approx(eager, rel=0.05)
    assert all(p.grad is None and not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
