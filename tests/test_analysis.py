"""`montessori analyze`, its report section, and generation.steer: which kinds of candidates helped,
read from a run directory written by hand (tests/shopfloor.py: code helps, how-to is neutral,
classification hurts)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from collections import Counter

import pytest

from montessori.analysis import TASK_TYPES, analyze, has_input, task_type
from montessori.cli import main
from montessori.config import GenerationConfig, load_preset
from montessori.generation.prompts import build_prompt, choose_examples
from montessori.generation.stage import derived_seed
from montessori.pipeline import StageContext
from montessori.readers import read_seeds
from montessori.report import write_report
from montessori.generation.stage import measured_by
from montessori.generation.steer import steer_weights
from montessori.store import RunStore, read_jsonl
from shopfloor import make_measured_run


@pytest.mark.parametrize("instruction, expected", [
    ("What does error code E14 on the CP-200 controller mean?", "open question"),  # not code, not math
    ("Which grease is approved for the P-40 motor bearings?", "open question"),
    ("How do I reset the overload relay on a P-40 pump?", "how-to"),
    ("Write a short email to a customer confirming the shipment.", "writing"),
    ("Rewrite this note in plain language: 'Pump cavitation observed.'", "rewriting"),
    ("Summarize this shift report: 'Line 2 stopped for 40 min.'", "rewriting"),
    ("Classify this ticket as warranty, repair or question: 'It stopped.'", "classification"),
    ("Extract the serial number from: 'Unit P40-2231-B, serial SN 88412.'", "extraction"),
    ("A tank holds 1200 litres and the pump moves 40 litres per minute. How long does it take to empty?", "math"),
    ("Write a Python function that converts bar to psi.", "code"),
    ("Write a SQL query that counts open tickets.", "code"),
    ("Ernst ago multi magic electrically", "other"),
])
def test_task_type_rule(instruction, expected):
    assert task_type(instruction) == expected and expected in TASK_TYPES


def test_has_input():
    assert has_input("Classify this message: 'The new controller is much quieter, thanks.'")
    assert has_input("Summarize the text below.\nLine 2 stopped for a belt change.")
    assert not has_input("How do I bleed air from the suction line?")
    assert not has_input("Don't start the pump's motor before the casing is full, why?")  # apostrophes


def test_influence_per_kind_intervals_examples_and_separators(tmp_path, capsys):
    run = make_measured_run(tmp_path / "run")
    summary, items = analyze(run)
    assert summary["measured"] == 12 and summary["invalid"] == 1 and len(items) == 12
    by_type = {g["value"]: g for g in summary["features"]["task_type"]}
    assert set(by_type) == {"code", "how-to", "classification"}
    code, cls = by_type["code"], by_type["classification"]
    assert code["n"] == 4 and code["mean"] == pytest.approx(0.65) and code["share_positive"] == 1.0
    assert code["ci_low"] <= code["mean"] <= code["ci_high"] and code["ci_low"] > by_type["how-to"]["ci_high"]
    assert cls["ci_high"] < 0
    assert [e["influence"] for e in code["top"]] == [0.8, 0.7, 0.6]  # best first
    assert [e["influence"] for e in cls["bottom"]] == [-0.8, -0.7, -0.6]  # worst first
    # The seed a candidate resembles most among its prompt's examples (not the first one shown).
    seeds = {g["value"]: g["n"] for g in summary["features"]["seed"]}
    assert seeds == {"task-008": 4, "task-002": 4, "task-005": 4}
    assert [g["value"] for g in summary["features"]["round"]] == [1]
    # The strongest separators: code (and its seed) go with high influence, classification with low.
    top = {(s["feature"], s["value"]): s for s in summary["separators"]}
    assert top[("task_type", "code")]["r"] > 0.5 and top[("task_type", "classification")]["r"] < -0.5
    assert top[("task_type", "code")]["share_high"] > top[("task_type", "code")]["share_low"]
    assert abs(summary["separators"][0]["r"]) >= abs(summary["separators"][-1]["r"])
    # CLI: JSON for scripts, the per-candidate record, a terminal table.
    assert main(["analyze", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["features"] == summary["features"]
    recorded = read_jsonl(run / "analysis" / "candidates.jsonl")
    assert len(recorded) == 12 and {r["task_type"] for r in recorded} == {"code", "how-to", "classification"}
    assert main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out
    assert "task_type" in out and "classification" in out and "separate high from low" in out.replace("\n", " ")


def test_report_section_with_plots(tmp_path):
    run = make_measured_run(tmp_path / "run")
    page = write_report(run).read_text()
    assert "Which data works: influence per kind of candidate" in page
    assert "features that best separate high from low influence" in page
    assert "top and bottom examples of each kind" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4  # influence histogram + per-kind bars + per-seed bars + separators
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "Write a Python function that converts litres per minute" in page


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


# --- generation.steer --------------------------------------------------------------------------------

def _prompts(weights=None) -> str:
    seeds = [(s.id, s.text) for s in read_seeds().records]
    out = []
    for i in range(40):
        synthetic = [(f"syn-{j}", f"synthetic instruction {j}") for j in range(i % 5)]
        rng = random.Random(derived_seed(0, 1, "r1", i))
        ex = choose_examples(rng, seeds, synthetic, 8, 2, weights)
        out.append(build_prompt("list" if i % 2 else "tagged", [t for _, t in ex]))
        out.append([e for e, _ in ex])
    return hashlib.sha256(json.dumps(out).encode()).hexdigest()


def test_steering_off_keeps_prompts_and_fingerprints_byte_identical():
    # The hash of these prompts before generation.steer existed (commit 8cfe8de).
    assert _prompts() == "de12706e441d2a2d9d8875eb6dfa7ab10a6f59db99b0325b45a1f5cb37820270"
    assert not GenerationConfig().steer.enabled
    assert "steer" not in GenerationConfig().fingerprint_dump()  # finished runs do not look stale


def test_weighted_examples_prefer_heavy_seeds():
    seeds = [(f"s{i}", f"seed {i}") for i in range(20)]
    weights = [10.0 if i < 4 else 1.0 for i in range(20)]
    counts = Counter()
    for n in range(300):
        chosen = choose_examples(random.Random(n), seeds, [], 6, 2, weights)
        assert len({e for e, _ in chosen}) == 6
        counts.update(e for e, _ in chosen)
    heavy = sum(counts[f"s{i}"] for i in range(4)) / 4
    light = sum(counts[f"s{i}"] for i in range(4, 20)) / 16
    assert heavy > 2.5 * light


def test_steer_weights_from_a_measured_run(tmp_path):
    source = make_measured_run(tmp_path / "small")
    config = load_preset("tiny", ["generation.steer.enabled=true", f"generation.steer.source={source}"])
    store = RunStore(tmp_path / "big")
    ctx = StageContext(config, store, 1, store.stage(1, "instructions"))
    seeds = [(s.id, s.text) for s in read_seeds(str(source / "seeds.jsonl")).records]
    weights, record = steer_weights(ctx, seeds, this_round=False, measured_by=measured_by())
    by_id = dict(zip([s for s, _ in seeds], weights))
    # code seeds (task-008 Python, task-020 SQL) up, classification seeds down, others unchanged.
    assert by_id["task-008"] > 1.5 and by_id["task-020"] == by_id["task-008"]
    assert by_id["task-005"] < 0.7 and by_id["task-026"] == by_id["task-005"]
    assert by_id["task-003"] == 1.0  # writing: not measured
    assert record["steer"]["measured"] == 12 and record["steer"]["kinds"]["code"]["n"] == 4
    # by seed: the candidates attributed to each seed.
    config.generation.steer.by = "seed"
    weights, record = steer_weights(ctx, seeds, this_round=False, measured_by=measured_by())
    assert dict(zip([s for s, _ in seeds], weights))["task-008"] > 1.5
    # This run's own earlier rounds: round 1 has none, so the seeds are drawn uniformly.
    config.generation.steer.source = None
    weights, record = steer_weights(ctx, seeds, this_round=False, measured_by=measured_by())
    assert weights is None and record["steer"]["measured"] == 0
