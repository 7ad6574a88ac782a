"""The default CUDA path (linear, graphed + compiled, bf16 copy of the student) against influence/core.py.

Run on a GPU machine: python -m pytest -m gpu tests/test_influence_gpu.py
The warm-up is the CPU one of test_influence.py (6 AdamW steps on the tiny random Llama); core runs on
the CPU in fp32 and is the truth for every row.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from test_influence import CANDIDATES, REFERENCE, warm_dir  # noqa: F401 (fixture)

from montessori.influence import AdamWState, InfluenceEngine, compute_influence, core, load_warmup
from montessori.influence.metrics import spearman
from montessori.models.batching import encode_pairs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs CUDA: CUDA graphs, the compiled step and the bf16 copy run there only")]


@pytest.fixture(scope="module")
def truth(warm_dir):  # noqa: F811
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    reference = encode_pairs(tokenizer, REFERENCE, 128)
    return [core.linear_influence(model, state, z, reference) for z in encode_pairs(tokenizer, CANDIDATES, 128)]


def on_cuda(warm_dir, **settings):  # noqa: F811
    model, tokenizer, state = load_warmup(warm_dir, "cuda")
    results = compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer, max_length=128,
                                reference_max_length=128, **settings)
    assert [r.status for r in results] == ["ok"] * len(CANDIDATES)
    return [r.influence for r in results]


def test_the_default_is_the_graphed_compiled_bf16_path(warm_dir):  # noqa: F811
    model, tokenizer, state = load_warmup(warm_dir, "cuda")
    engine = InfluenceEngine(model, AdamWState.from_state_dict(state, list(model.parameters())),
                             encode_pairs(tokenizer, REFERENCE, 128), pad_id=tokenizer.pad_token_id)
    try:
        assert engine.estimator == "linear" and engine.linear_kernel == "graphed" and engine.fast.use_graphs
        assert engine.grad_precision == "bfloat16" and all(p.dtype == torch.bfloat16 for p in engine.fast.own)
        assert engine.fast.compiled  # compile="auto": the copy's decoder layers
    finally:
        engine.close()


def test_default_cuda_path_ranks_like_core(warm_dir, truth):  # noqa: F811
    # Tolerance: the bf16 candidate gradient is the only approximation. On the CPU the same bf16 copy
    # (linear_kernel=flat) is within a median 5e-4, at most 6e-4, relative of core here, Spearman 1.000;
    # docs/benchmarks.md reports GPU bf16 spreads up to a median 5% (graphed vs hooks on random
    # TinyLlama-1.1B weights, whose values sit near zero). These values are ~0.1 and span 7%, two of them
    # only 2e-4 apart: 2% relative bounds each value (40x the CPU error) and Spearman >= 0.9 allows a few
    # swaps of neighbours, while a wrong moment, scale or sign moves values by far more.
    values = on_cuda(warm_dir)
    rel = [abs(v - t) / abs(t) for v, t in zip(values, truth)]
    assert statistics.median(rel) < 0.01 and max(rel) < 0.02, rel
    assert spearman(values, truth) >= 0.9
    # Two runs agree to float rounding, not bit for bit: on the H200 (2026-12-01) a second run differed in
    # the 7th digit (0.1031845360 vs 0.1031846018, 6e-7 relative): inductor's split reductions and the
    # embedding gradient's atomic adds sum in a varying order. Influence values are written once per
    # candidate (a resume never recomputes one), so this is what the engine needs.
    assert on_cuda(warm_dir) == pytest.approx(values, rel=1e-5)


@pytest.mark.parametrize("kernel", ["graphed", "flat", "hooks"])
def test_fp32_candidate_gradient_equals_core(warm_dir, truth, kernel):  # noqa: F811
    # fp32 everywhere (no TF32: precision_context turns it off): only the order of float sums differs
    # from core (cuBLAS, inductor's fused update pass). On the CPU flat/hooks equal core to 1e-6
    # relative; docs/benchmarks.md has fp32 graphed = hooks to a median 5e-4 on TinyLlama-1.1B's
    # near-zero values. 1e-4 relative here still fails a bf16 gradient slipping in (5e-4, above).
    values = on_cuda(warm_dir, grad_precision="float32", linear_kernel=kernel)
    assert values == pytest.approx(truth, rel=1e-4)
