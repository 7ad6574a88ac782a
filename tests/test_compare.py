"""`montessori compare`: runs' eval results side by side, as a table, markdown and a plot."""

from __future__ import annotations

import json

import pytest

from montessori.cli import main
from montessori.evaluation.compare import compare
from montessori.pipeline import run_pipeline

from tests.test_eval_cli import make_run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from montessori.config import load_preset
    from montessori.models.load import resolve_model_dir
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, trained in (("run-a", "tiny-random:0"), ("run-b", "tiny-random:1")):
        config = load_preset("tiny", ["eval.max_examples=3", "eval.bootstrap_samples=100"])
        store = make_run(root / name, resolve_model_dir(trained), config)
        run_pipeline(config, store.root, only="eval", progress=False)
        runs.append(store.root)
    return runs


def test_compare_prints_every_metric_with_intervals_and_writes_plot(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "run-a" in printed and "run-b" in printed
    md = (out / "compare.md").read_text()
    header = md.splitlines()[0]
    assert header == "| metric | run-a | run-b |"
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()[2:] if line.startswith("| ")}
    assert {"loss", "perplexity", "loss_diff"} <= set(rows)
    # Each cell is the trained student's value with its interval, read from the run's results.json.
    results = json.loads((two_runs[0] / "round-1" / "eval" / "results.json").read_text())
    loss = results["loss"]["trained"]
    assert f"{loss['token_mean']:.4g} [{loss['token_mean_low']:.4g}, {loss['token_mean_high']:.4g}]" in rows["loss"]
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compare_reads_eval_output_folders_too(two_runs, tmp_path):
    eval_out = tmp_path / "ev"
    assert main(["eval", "tiny-random:0", "tiny-random:1", "--max-examples", "3", "--max-length", "128",
                 "--bootstrap", "50", "--device", "cpu", "--no-progress", "--out", str(eval_out)]) == 0
    columns, metrics, cells = compare([two_runs[0], eval_out])
    assert columns == ["run-a", "ev/tiny-random:0", "ev/tiny-random:1"]
    # run-a's trained student is tiny-random:0 and both saw the same builtin prompts (first 3).
    assert cells[("loss", "run-a")]["value"] == pytest.approx(cells[("loss", "ev/tiny-random:0")]["value"], rel=1e-6)


def test_compare_of_a_run_without_results_exits_2(tmp_path, capsys):
    (tmp_path / "empty-run" / "round-1").mkdir(parents=True)
    assert main(["compare", str(tmp_path / "empty-run"), "--out", str(tmp_path)]) == 2
    assert "no evaluation results" in capsys.readouterr().err
