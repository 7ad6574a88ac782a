"""Stage `mechanism` on the `tiny` preset: both teachers' fresh candidates, same prompts, same warm-up state."""

import json

import pytest

from montessori.config import load_preset
from montessori.influence.mechanism import MechanismCandidate, summarize
from montessori.pipeline import run_pipeline
from montessori.records import InfluenceResult
from montessori.report import write_report
from montessori.store import read_jsonl


@pytest.fixture(scope="module")
def mechanism_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mech") / "run"
    cfg = load_preset("tiny")
    run_pipeline(cfg, run, until="mechanism", progress=False)
    return cfg, run, run / "round-1" / "mechanism"


def test_both_teachers_scored_on_the_same_prompts(mechanism_run):
    cfg, run, folder = mechanism_run
    candidates = read_jsonl(folder / "candidates.jsonl", MechanismCandidate)
    results = {r.id: r for r in read_jsonl(folder / "influence.jsonl", InfluenceResult)}
    summary = json.loads((folder / "summary.json").read_text())
    n, prompts = cfg.generation.instructions.n, cfg.mechanism.num_prompts
    by_teacher = {t: [c for c in candidates if c.teacher == t] for t in ("updated", "original")}
    assert {c.prompt_id for c in by_teacher["updated"]} == {c.prompt_id for c in by_teacher["original"]}
    assert len({c.prompt_id for c in candidates}) == prompts == summary["prompts"]
    for teacher, mine in by_teacher.items():
        entry = summary[teacher]
        kept = [c for c in mine if c.dropped is None]
        assert entry["candidates"] == len(mine) == prompts * n
        assert entry["dropped"] == len(mine) - len(kept)
        assert {c.id for c in kept} <= set(results) and entry["scored"] == len(kept)  # every kept one scored
        ok = [results[c.id].influence for c in kept if results[c.id].status == "ok"]
        assert entry["measured"] == len(ok) > 0
        assert entry["mean_influence"] == pytest.approx(sum(ok) / len(ok))
        assert entry["share_positive"] == pytest.approx(sum(v > 0 for v in ok) / len(ok))
        assert entry["mean_influence_low"] <= entry["mean_influence"] <= entry["mean_influence_high"]
        assert entry["share_positive_low"] <= entry["share_positive"] <= entry["share_positive_high"]
    diff = summary["difference"]
    assert diff["mean_influence"] == pytest.approx(summary["updated"]["mean_influence"]
                                                   - summary["original"]["mean_influence"])
    assert diff["low"] <= diff["mean_influence"] <= diff["high"]
    # The two teachers are the DPO output and the teacher it started from, and they wrote different text.
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["teachers"] == {"updated": str(run / "round-1" / "dpo" / "model"),
                                             "original": cfg.models.teacher}
    assert [c.instruction for c in by_teacher["updated"]] != [c.instruction for c in by_teacher["original"]]
    assert "Mechanism check" in (write_report(run).parent / "report.md").read_text()


def test_resumes_from_partial_scores(mechanism_run):
    cfg, run, folder = mechanism_run
    before = json.loads((folder / "summary.json").read_text())
    lines = (folder / "influence.jsonl").read_text().splitlines()
    (folder / "influence.jsonl").write_text(lines[0] + "\n")  # as if killed after the first candidate
    (folder / "manifest.json").unlink()
    run_pipeline(cfg, run, until="mechanism", progress=False)
    assert len((folder / "influence.jsonl").read_text().splitlines()) == len(lines)
    after = json.loads((folder / "summary.json").read_text())
    for teacher in ("updated", "original"):
        assert after[teacher]["mean_influence"] == pytest.approx(before[teacher]["mean_influence"], rel=1e-9)


def test_summary_intervals_and_paired_difference():
    prompts = [f"p{i}" for i in range(6)]
    records, results = [], {}
    for teacher, base in (("updated", 1.0), ("original", -1.0)):
        for i, p in enumerate(prompts):
            for j in range(2):
                cid = f"{teacher}-{p}-s{j}"
                records.append(MechanismCandidate(cid, teacher, p, "x", "y"))
                results[cid] = InfluenceResult(cid, base + 0.1 * i + 0.01 * j, 0.0, 0.0)
    records.append(MechanismCandidate("original-p0-s2", "original", "p0", None, dropped="unparsed"))
    s = summarize(records, results, prompts, samples=300, seed=0)
    assert s["updated"]["share_positive"] == 1.0 and s["original"]["share_positive"] == 0.0
    assert s["original"]["candidates"] == 13 and s["original"]["dropped"] == 1 and s["original"]["measured"] == 12
    assert s["difference"]["mean_influence"] == pytest.approx(2.0)
    # Paired: each prompt shifts both teachers alike, so the difference is exactly 2 in every resample.
    assert s["difference"]["low"] == pytest.approx(2.0) and s["difference"]["high"] == pytest.approx(2.0)
    assert s["updated"]["mean_influence_low"] < s["updated"]["mean_influence"] < s["updated"]["mean_influence_high"]
