"""The baselines in the pipeline on the `tiny` preset: `method: self-instruct` and the data-utility
ablations `influence.utility: loss | judge`, end to end through the CLI."""

import json

import pytest

from montessori.cli import main
from montessori.store import read_jsonl


def manifest(run, stage):
    return json.loads((run / "round-1" / stage / "manifest.json").read_text())


def test_self_instruct_baseline_end_to_end(tmp_path, capsys):
    run = tmp_path / "si"
    assert main(["init", str(run), "--preset", "tiny"]) == 0
    assert main(["run", str(run / "config.yaml"), "method=self-instruct"]) == 0
    # No influence, no DPO: the base teacher writes the training set, the student is SFT-trained on it.
    assert sorted(p.name for p in (run / "round-1").iterdir()) == ["dataset", "eval", "sft"]
    data = manifest(run, "dataset")
    assert not any("dpo" in key for key in data["inputs"])
    assert len(read_jsonl(run / "round-1" / "dataset" / "pairs.jsonl")) == data["counts"]["pairs"] == 8
    assert (run / "round-1" / "sft" / "model" / "config.json").exists()
    results = json.loads((run / "round-1" / "eval" / "results.json").read_text())
    assert results["metrics"]
    assert main(["status", str(run)]) == 0
    assert "pending" not in capsys.readouterr().out


@pytest.mark.parametrize("utility", ["loss", "judge"])
def test_utility_ablation_end_to_end(tmp_path, utility):
    from montessori.evaluation.loss import example_losses
    from montessori.influence.warmup import load_warmup
    from montessori.records import Pair
    run = tmp_path / utility
    assert main(["init", str(run), "--preset", "tiny"]) == 0
    assert main(["run", str(run / "config.yaml"), f"influence.utility={utility}", "preferences.rule=rank"]) == 0
    r1 = run / "round-1"
    scores = read_jsonl(r1 / "influence" / "influence.jsonl")
    split = json.loads((r1 / "warmup" / "split.json").read_text())
    assert {s["id"] for s in scores} == set(split["probing"])
    assert {s["estimator"] for s in scores} == {utility}
    assert manifest(run, "influence")["counts"]["ok"] == len(scores)
    if utility == "loss":  # the warmed-up student's own token-mean loss on each candidate
        model, tokenizer, _ = load_warmup(r1 / "warmup", "cpu")
        pairs = {p["id"]: p for p in read_jsonl(r1 / "responses" / "pairs.jsonl")}
        first = scores[0]
        direct = example_losses(model, tokenizer, [Pair(**pairs[first["id"]])], batch_size=1)[0]
        assert first["influence"] == pytest.approx(direct.loss_sum / direct.tokens, rel=1e-5)
    else:  # a 1-10 grade, centred
        assert all(-4.5 <= s["influence"] <= 4.5 for s in scores if s["status"] == "ok")
    prefs = read_jsonl(r1 / "preferences" / "preferences.jsonl")
    assert prefs and all(p["chosen_influence"] > p["rejected_influence"] for p in prefs)
    assert (r1 / "dpo" / "model" / "config.json").exists() and (r1 / "sft" / "model" / "config.json").exists()
