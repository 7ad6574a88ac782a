"""influence/core.py, the readable definition, against the obvious method; and every fast path against it.

The obvious method lives here, not in core: deep-copy the model, load a torch.optim.AdamW with the
warm-up state, take the real step on the candidate, evaluate the reference set with HF's full logits.
Tolerances: influences are ~1e-1, differences of ~10-nat token means summed in fp32 per example, so
float rounding leaves ~1e-7 to ~1e-6 (TOL below); 5e-6 absolute would catch a wrong moment, step count, bias correction,
weight decay or loss normalisation (each moves a value by >1e-3 here).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_influence import CANDIDATES, REFERENCE, obvious_influence, warm_dir  # noqa: F401 (fixture)

from montessori.influence import compute_influence, core, load_warmup
from montessori.models.batching import encode_pairs

# 5e-6, not 1e-6: on the 2-core AMD EPYC CI runs on, the weight-decay case (lr·wd = 2e-3) differs from the
# deepcopy method by 1.03e-6 (measured 2026-12-07, on the code of d8e68ec too): fp32 rounding of ~10-nat
# sums. Every error this test exists for moves a value by more than 1e-3.
TOL = 5e-6


def with_weight_decay(state: dict) -> dict:
    state = copy.deepcopy(state)
    state["param_groups"][0].update(weight_decay=20.0, lr=1e-4)  # lr·wd = 2e-3: a sizeable share of Δ
    return state


def obvious_linear(model, tokenizer, state: dict, pair) -> float:
    """−∇L_ref · (θ_z − θ_warm), with θ_z from torch.optim.AdamW's own step on a deep copy."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    optimizer.load_state_dict(copy.deepcopy(state))
    sums, count = 0.0, 0
    for e in encode_pairs(tokenizer, REFERENCE, 128):
        logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
        target = torch.tensor(e.labels[1:])
        sums = sums + F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    ref_grad = torch.autograd.grad(sums / count, list(model.parameters()))
    warm = [p.detach().clone() for p in model.parameters()]
    e = encode_pairs(tokenizer, [pair], 128)[0]
    model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.backward()
    optimizer.step()
    return -sum(float(torch.dot(r.flatten().double(), (p.detach() - w).flatten().double()))
                for r, p, w in zip(ref_grad, model.parameters(), warm))


PAIRS = CANDIDATES[:3]


@pytest.fixture(scope="module")
def by_core(warm_dir):  # noqa: F811
    """core's values, {(weight_decay, estimator): [I(z) for z in PAIRS]} (computed once: core is slow)."""
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    reference, pairs = encode_pairs(tokenizer, REFERENCE, 128), encode_pairs(tokenizer, PAIRS, 128)
    out = {}
    for wd in (False, True):
        s = with_weight_decay(state) if wd else state
        out[wd, "exact"] = [core.exact_influence(model, s, z, reference) for z in pairs]
        out[wd, "linear"] = [core.linear_influence(model, s, z, reference) for z in pairs]
    return out


@pytest.mark.parametrize("weight_decay", [False, True])
def test_core_equals_deepcopy_and_torch_adamw(warm_dir, by_core, weight_decay):  # noqa: F811
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    state = with_weight_decay(state) if weight_decay else state
    pairs = PAIRS
    exact, linear = by_core[weight_decay, "exact"], by_core[weight_decay, "linear"]
    assert exact == pytest.approx([obvious_influence(model, tokenizer, state, p) for p in pairs], abs=TOL)
    assert linear == pytest.approx([obvious_linear(model, tokenizer, state, p) for p in pairs], abs=TOL, rel=1e-5)
    assert linear != pytest.approx(exact, abs=TOL)  # two estimators, really computed
    assert len({round(x, 4) for x in exact}) == 3  # the candidates really differ


# Every layout and kernel the CPU can run. exact: eval_batch_size=1, so the engine sums the same tokens
# per fp32 partial sum as core (batches of 8 move the reference loss by ~1e-6: test_influence.py holds
# the batch size to 2e-5). linear: ∇L_ref in fp32, the update in any form.
PATHS = {
    "exact-shadow-device": dict(estimator="exact", shadow="device", eval_batch_size=1),
    "exact-shadow-host": dict(estimator="exact", shadow="host", eval_batch_size=1),
    "linear-hooks": dict(estimator="linear", linear_kernel="hooks", ref_grad_dtype="float32"),
    "linear-flat": dict(estimator="linear", linear_kernel="flat", ref_grad_dtype="float32"),
    "linear-flat-unpadded": dict(estimator="linear", linear_kernel="flat", ref_grad_dtype="float32", pad_multiple=1),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_decay", [False, True])
def test_compute_influence_equals_core(warm_dir, by_core, path, weight_decay):  # noqa: F811
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    state = with_weight_decay(state) if weight_decay else state
    settings = PATHS[path]
    expected = by_core[weight_decay, settings["estimator"]]
    results = compute_influence(model, state, PAIRS, REFERENCE, tokenizer=tokenizer, max_length=128,
                                reference_max_length=128, **settings)
    assert [r.status for r in results] == ["ok"] * 3
    assert [r.influence for r in results] == pytest.approx(expected, abs=TOL)


def test_each_adamw_pass_is_core_adamw_delta():
    """The engine's foreach step and dot, and fast.py's fused dot, are torch's AdamW written for speed:
    each equals core.adamw_delta (the one formula: moments, bias correction, weight decay)."""
    from montessori.influence.engine import foreach_stepped, foreach_update_dots
    from montessori.influence.fast import adam_dot
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (300,), (7, 5)]
    theta, g, m, r = ([torch.randn(s, generator=gen) * k for s in shapes] for k in (0.02, 1e-2, 1e-3, 1.0))
    v = [torch.randn(s, generator=gen).square() * 1e-6 for s in shapes]
    hp = dict(step=41, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    delta = [core.adamw_delta(*a, **hp) for a in zip(theta, g, m, v)]
    out = [torch.empty_like(t) for t in theta]
    foreach_stepped(theta, g, m, v, out, hp["step"], hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"])
    for o, t, d in zip(out, theta, delta):  # Δ ~1e-4 on θ ~2e-2, whose fp32 spacing is ~2e-9
        assert torch.allclose(o, t + d, rtol=0, atol=1e-8) and not torch.allclose(o, t, rtol=0, atol=1e-6)
    # the Adam part of r·Δ (the dots leave the weight-decay part, −lr·wd·r·θ, to the caller)
    adam_part = sum(float(torch.dot(ri.flatten().double(), (d + hp["lr"] * hp["weight_decay"] * t).flatten().double()))
                    for ri, d, t in zip(r, delta, theta))
    b1, b2 = hp["betas"]
    t = hp["step"] + 1
    dots = float(foreach_update_dots(r, g, m, v, hp["step"], hp["lr"], hp["betas"], hp["eps"]))
    fused = sum(float(adam_dot(ri.flatten(), gi.flatten(), mi.flatten(), vi.flatten(), b1, b2,
                               (1 - b2 ** t) ** 0.5, hp["eps"])) for ri, gi, mi, vi in zip(r, g, m, v))
    fused *= -hp["lr"] / (1 - b1 ** t)
    assert dots == pytest.approx(adam_part, rel=1e-5) and fused == pytest.approx(adam_part, rel=1e-5)


# The presets' other architectures (qwen-gemma: a Qwen2 teacher, a Gemma-3 student), as TRL tests its
# trainers: the definition against the obvious method and the engine's paths against the definition.
# (Llama is the warm_dir above.) Gemma-3 brings sliding-window layers, scaled embeddings and soft caps.
@pytest.fixture(scope="module", params=["tiny-random-qwen2:0", "tiny-random-gemma3:1"])
def arch_warm_dir(request, tmp_path_factory):
    from test_influence import WARM
    from montessori.config import WarmupConfig
    from montessori.influence import save_warmup, train_warmup
    from montessori.models import load_model
    model, tokenizer = load_model(request.param, device="cpu", dtype="float32")
    optimizer, _ = train_warmup(model, encode_pairs(tokenizer, WARM, 128), WarmupConfig(lr=1e-3),
                                pad_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("warmup")
    save_warmup(folder, model, tokenizer, optimizer)
    return folder


def test_core_and_engine_on_each_preset_architecture(arch_warm_dir):
    model, tokenizer, state = load_warmup(arch_warm_dir, "cpu")
    reference, pairs = encode_pairs(tokenizer, REFERENCE, 128), encode_pairs(tokenizer, PAIRS, 128)
    exact = [core.exact_influence(model, state, z, reference) for z in pairs]
    linear = [core.linear_influence(model, state, z, reference) for z in pairs]
    assert exact == pytest.approx([obvious_influence(model, tokenizer, state, p) for p in PAIRS], abs=TOL)
    assert linear == pytest.approx([obvious_linear(model, tokenizer, state, p) for p in PAIRS], abs=TOL, rel=1e-5)
    assert len({round(x, 4) for x in exact}) == 3
    for path in ("exact-shadow-device", "linear-flat"):
        settings = PATHS[path]
        results = compute_influence(model, state, PAIRS, REFERENCE, tokenizer=tokenizer, max_length=128,
                                    reference_max_length=128, **settings)
        expected = exact if settings["estimator"] == "exact" else linear
        assert [r.influence for r in results] == pytest.approx(expected, abs=TOL), path
