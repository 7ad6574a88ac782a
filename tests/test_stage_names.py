"""A stage's folder is reached through the stage, never by its name as a literal (issue 25): stage
functions get their inputs' folders as parameters from their declaration, and views name the stage
function that writes what they read (`store.stage(round, run_influence)`), one jump from the writer.
The names themselves appear only in the declarations (`@stage("influence", inputs=(...))`), the CLI
and the docs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from montessori.context import stage
from montessori.method import STAGE_NAMES
from montessori.store import RunStore

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "montessori"
ALLOWED = {ROOT / "cli.py"}  # `--only`/`--until` help and examples
# The package, and the scripts that read run directories (experiments, benchmarks).
SOURCES = [*ROOT.rglob("*.py"), *(REPO / "experiments").glob("*.py"), *(REPO / "bench").glob("*.py")]


def literal_folder_reaches(source: str, names=STAGE_NAMES) -> list[str]:
    """Where `source` reaches a stage's folder by a literal name: `x.stage(r, "name")`,
    `x.input("name")`, `path / "name"`, or a path string such as "round-*/name/file"."""
    found = []

    def named(node) -> str | None:
        return node.value if isinstance(node, ast.Constant) and node.value in names else None

    tree = ast.parse(source)
    # Prose may name a folder (docstrings, messages with spaces; an error's `file=` label): it reaches nothing.
    prose = {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "file"}
    for node in ast.walk(tree):
        if id(node) in prose or isinstance(node, ast.Constant) and isinstance(node.value, str) and " " in node.value:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("stage", "input"):
            found += [f"line {node.lineno}: .{node.func.attr}(... {named(a)!r})" for a in node.args if named(a)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found += [f"line {node.lineno}: / {named(side)!r}" for side in (node.left, node.right) if named(side)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value:
            parts = node.value.split("/")
            found += [f"line {node.lineno}: {node.value!r}" for part in parts[:-1] if part in names]
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            if " " in text:
                continue
            parts = text.split("/")
            found += [f"line {node.lineno}: f{text!r}" for part in parts[:-1] if part in names]
    return found


def test_no_module_reaches_a_stage_folder_by_a_literal_name():
    offenders = [f"{path.relative_to(REPO)} {where}"
                 for path in sorted(SOURCES) if path not in ALLOWED
                 for where in literal_folder_reaches(path.read_text())]
    assert offenders == []


@pytest.mark.parametrize("source", [
    'store.stage(1, "influence").path',
    'ctx.input("responses")',
    'run_dir / "round-1" / "sft" / "model"',
    'paths = source.glob("round-*/influence/influence.jsonl")',
    'path = run / f"round-{r}/eval/results.json"',
])
def test_the_check_sees_each_way_of_naming_a_folder(source):
    assert literal_folder_reaches(source)


@pytest.mark.parametrize("source", [
    'store.stage(1, run_influence).path / "influence.jsonl"',  # the writer, not its name
    'value = r["influence"]',  # a record's field
    'check_wsd(cfg, "dpo")',  # a config section
    'raise InputError("no round-*/sft/model yet", file="influence/influence.jsonl")',  # a message
    '@stage("influence", inputs=("responses", "warmup"))\ndef run_influence(ctx, responses, warmup): ...',
])
def test_the_check_leaves_other_uses_of_the_words_alone(source):
    assert literal_folder_reaches(source) == []


def test_a_stage_gets_the_folders_of_the_inputs_it_names(tmp_path, monkeypatch):
    from montessori import context
    from montessori.config import load_preset
    from montessori.context import StageContext
    monkeypatch.setattr(context, "DECLARED", {})  # toy stages stay out of the registry

    @stage("toy_reader", keys=(), inputs=("toy_a", "toy_b"))
    def run_reader(ctx, toy_a):  # reads one of its two inputs
        return {"read": toy_a.stage, "path": str(toy_a.path)}

    store = RunStore(tmp_path)
    ctx = StageContext(load_preset("tiny"), store, 2, store.stage(2, "toy_reader"), progress=False)
    # Called with the context alone; the folder is this round's folder of the named input.
    assert run_reader(ctx) == {"read": "toy_a", "path": str(store.stage(2, "toy_a").path)}
    assert run_reader.stage.inputs == ("toy_a", "toy_b") and run_reader.stage.function is run_reader


def test_a_parameter_that_is_not_a_declared_input_is_refused_at_declaration(monkeypatch):
    from montessori import context
    monkeypatch.setattr(context, "DECLARED", {})
    with pytest.raises(TypeError, match="not among its declared inputs"):
        @stage("toy_undeclared", keys=(), inputs=("toy_a",))
        def run_bad(ctx, toy_c):
            return {}
