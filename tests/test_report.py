"""The run report: counts, plots and examples read back from a run directory."""

from __future__ import annotations

import base64
import re

import pytest

from montessori.cli import main
from montessori.errors import InputError
from montessori.records import Candidate, InfluenceResult
from montessori.report import write_report
from montessori.store import RunStore, atomic_write_json, write_jsonl


def make_run(root) -> RunStore:
    store = RunStore(root)
    kept = [Candidate(id=f"r1-p{i}-s0", prompt_id=f"p{i}", completion="...", instruction=f"Task number {i} <b>")
            for i in range(6)]
    dropped = [Candidate(id="x1", prompt_id="p0", completion="...", instruction=None, dropped="duplicate"),
               Candidate(id="x2", prompt_id="p0", completion="...", instruction=None, dropped="too_long"),
               Candidate(id="x3", prompt_id="p1", completion="...", instruction=None, dropped="banned_word")]
    write_jsonl(store.stage(1, "instructions").file("candidates.jsonl"), kept)
    write_jsonl(store.stage(1, "instructions").file("dropped.jsonl"), dropped)
    values = [0.5, 0.2, -0.1, 0.05, -0.3, 0.9]
    results = [InfluenceResult(id=c.id, influence=v, ref_loss_before=2.0, ref_loss_after=2.0 - v)
               for c, v in zip(kept, values)]
    results.append(InfluenceResult(id="r1-bad", influence=None, ref_loss_before=2.0, ref_loss_after=None,
                                   status="non_finite_loss"))
    write_jsonl(store.stage(1, "influence").file("influence.jsonl"), results)
    store.stage(1, "preferences").write_manifest(fingerprint="f", config_hash="c", inputs={}, started=0.0,
                                           counts={"rule": "rank", "pairs": 3, "prompts": 6, "prompts_with_pairs": 3,
                                                   "prompts_without_pair": 3})
    write_jsonl(store.stage(1, "dpo").file("metrics.jsonl"),
                [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/margins": 0.1 * s, "rewards/accuracies": 1.0}
                 for s in (1, 2, 3)])
    write_jsonl(store.stage(1, "sft").file("metrics.jsonl"), [{"step": s, "loss": 3.0 - 0.5 * s} for s in (1, 2)])
    atomic_write_json(store.stage(1, "eval").file("results.json"), {"reference_loss": {"student": 1.234}})
    return store


def test_report_has_counts_influence_plots_and_examples(tmp_path):
    make_run(tmp_path)
    page = write_report(tmp_path).read_text()
    md = (tmp_path / "report.md").read_text()
    # generated 9 = kept 6 + filtered 2 + duplicate 1
    assert "| probing instructions | 9 | 2 | 1 | 6 |" in md
    assert re.search(r"<td>probing instructions</td><td>9</td><td>2</td><td>1</td><td>6</td>", page)
    assert "| 6 | 1 | 0.6667 |" in md  # measured, invalid, share positive (4 of 6)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # influence histogram, DPO margin/accuracy, SFT loss
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    # Most influential first, least influential first; text is escaped, not injected.
    assert "Task number 5 &lt;b&gt;" in page and "<b>" not in page.split("<body>")[1]
    most = md.index("| 0.9 | r1-p5-s0 |")
    least = md.index("| -0.3 | r1-p4-s0 |")
    assert most < least
    assert "reference_loss.student" in md and "1.234" in md
    assert "| rank | 3 | 6 | 3 | 3 |" in md
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_report_of_a_partial_run_and_the_cli(tmp_path, capsys):
    store = RunStore(tmp_path)
    write_jsonl(store.stage(1, "instructions").file("candidates.jsonl"),
                [Candidate(id="a", prompt_id="p", completion="c", instruction="Do a thing")])
    assert main(["report", str(tmp_path)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (tmp_path / "report.html").read_text()
    assert "Generated candidates" in page and "Teacher DPO" not in page


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(InputError, match="not a run directory"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
