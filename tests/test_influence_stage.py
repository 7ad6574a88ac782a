"""Stage `influence` through the pipeline on the `tiny` preset: records, resume by id, both estimators."""

from __future__ import annotations

import json

import pytest
import torch

from montessori.pipeline import run_pipeline
from montessori.records import InfluenceResult
from montessori.store import read_jsonl, write_jsonl

from test_warmup import fake_responses_stage, pairs


def reference_file(tmp_path):
    path = tmp_path / "reference.jsonl"
    rows = [{"instruction": f"Spell the number {i}.", "response": f"The number {i} is spelled {w}."}
            for i, w in enumerate(["zero", "one", "two", "three", "four", "five"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_influence_stage_scores_every_probing_pair_and_resumes(tmp_path, tiny_config):
    fake_responses_stage(tmp_path, pairs(12))
    tiny_config.data.reference = reference_file(tmp_path)
    run_pipeline(tiny_config, tmp_path, only="warmup", progress=False)
    run_pipeline(tiny_config, tmp_path, only="influence", progress=False)
    folder = tmp_path / "round-1" / "influence"
    results = read_jsonl(folder / "influence.jsonl", InfluenceResult)
    probing = json.loads((tmp_path / "round-1" / "warmup" / "split.json").read_text())["probing"]
    assert [r.id for r in results] == probing and len(results) == 8
    assert all(r.status == "ok" and r.estimator == "exact" for r in results)
    assert all(r.influence == r.ref_loss_before - r.ref_loss_after for r in results)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"]["ok"] == 8

    # Interrupted after 5 candidates: the re-run scores only the 3 missing ones, with the same values.
    write_jsonl(folder / "influence.jsonl", results[:5])
    (folder / "manifest.json").unlink()
    run_pipeline(tiny_config, tmp_path, only="influence", progress=False)
    resumed = read_jsonl(folder / "influence.jsonl", InfluenceResult)
    assert [r.id for r in resumed] == probing
    assert [r.influence for r in resumed] == [r.influence for r in results]

    # The other estimator: a config change re-runs the stage from scratch.
    tiny_config.influence.estimator = "linear"
    run_pipeline(tiny_config, tmp_path, only="influence", progress=False)
    linear = read_jsonl(folder / "influence.jsonl", InfluenceResult)
    assert [r.id for r in linear] == probing
    assert all(r.status == "ok" and r.estimator == "linear" for r in linear)
    assert torch.tensor([r.influence for r in linear]).isfinite().all()

    # The linear step's fast path (influence.linear_kernel=flat: fused update per parameter, padded
    # candidates) is a config key of the same estimator: the stage re-runs and gives the same values.
    tiny_config.influence.linear_kernel, tiny_config.influence.pad_multiple = "flat", 16
    run_pipeline(tiny_config, tmp_path, only="influence", progress=False)
    flat = read_jsonl(folder / "influence.jsonl", InfluenceResult)
    assert [r.id for r in flat] == probing
    assert [r.influence for r in flat] == pytest.approx([r.influence for r in linear], rel=1e-5, abs=1e-9)
    assert [r.influence for r in flat] != [r.influence for r in linear]  # recomputed, not reused
    from montessori.influence.settings import InfluenceSettings
    settings = InfluenceSettings.from_config(tiny_config)
    assert (settings.linear_kernel, settings.pad_multiple) == ("flat", 16)
