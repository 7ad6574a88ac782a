"""Issue 15's reproductions for the run directory: one writer, nothing deleted before everything is
checked, one line and the right exit code for every failure, decode-safe append-only files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from montessori import pipeline
from montessori.cli import main
from montessori.config import load_preset
from montessori.context import Stage, load_function
from montessori.errors import MontessoriError
from montessori.store import JsonlAppender, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run directory and its content hash (the log and the lock aside)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in ("montessori.log", ".lock")}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture()
def finished_copy(finished_tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run)
    return run


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "montessori.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# --- one writer per run directory ---------------------------------------------------------------

def test_a_second_run_on_the_same_directory_is_refused_and_a_killed_one_releases_it(tmp_path):
    run = tmp_path / "run"
    assert main(["init", str(run), "--preset", "tiny"]) == 0
    config = str(run / "config.yaml")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "montessori.cli", "run", config, "--until", "instructions"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not ((run / ".lock").exists() and (run / ".lock").read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = cli("run", config, "--until", "instructions")
        assert second.returncode == 2
        assert error_lines(second.stderr) == [error_lines(second.stderr)[-1]]
        assert f"pid {first.pid}" in second.stderr and "in use by another montessori run" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the OS drops the lock with the process
        first.wait()
    # The killed run's lock is gone: the next run takes it, resumes and finishes.
    third = cli("run", config, "--until", "instructions")
    assert third.returncode == 0, third.stderr
    candidates = read_jsonl(run / "round-1" / "instructions" / "candidates.jsonl")
    ids = [c["id"] for c in candidates]
    manifest = json.loads((run / "round-1" / "instructions" / "manifest.json").read_text())
    assert len(ids) == len(set(ids)) == manifest["counts"]["kept"]


def test_status_and_report_read_a_locked_run(finished_tiny_run, capsys):
    from montessori.store import RunLock
    with RunLock(finished_tiny_run):
        assert main(["status", str(finished_tiny_run)]) == 0
        assert main(["report", str(finished_tiny_run)]) == 0
    assert "done" in capsys.readouterr().out


# --- everything checked before anything is deleted ------------------------------------------------

@pytest.mark.parametrize("override", [
    "models.teacher=/nonexistent", "models.teacher=tiny-random:abc", "models.student=./no/such/dir",
    "generation.num_prompts=0", "split.probing=0", "split.warmup=0", "sft.num_pairs=0", "sft.micro_batch_size=0",
    "generation.instructions.n=0", "generation.batch_size=0", "influence.eval_batch_size=0", "rounds=0",
    "generation.instructions.temperature=-1", "generation.responses.top_p=5", "dpo.warmup_ratio=1.5",
    "sft.lr=0", "warmup.lr=-1", "preferences.max_per_prompt=0", "data.max_reference=0",
])
def test_a_bad_value_is_refused_before_any_output_is_touched(finished_copy, override, capsys):
    before = snapshot(finished_copy)
    assert main(["run", str(finished_copy / "config.yaml"), override]) == 2
    err = error_lines(capsys.readouterr().err)
    key = override.split("=")[0]
    assert len(err) == 1 and err[0].startswith("error:") and key in err[0]
    assert snapshot(finished_copy) == before


def test_only_what_the_scheduled_stages_read_is_checked(finished_copy, capsys):
    """`--until responses` runs the teacher's stages only: a student that is not installed (yet) must not
    stop them, and the same student still refuses the whole run."""
    config = str(finished_copy / "config.yaml")
    assert main(["run", config, "models.student=./no/such/dir", "--until", "responses"]) == 0
    assert main(["run", config, "models.student=./no/such/dir"]) == 2
    assert "models.student" in capsys.readouterr().err


def test_a_failing_rerun_leaves_the_last_good_result(finished_copy, capsys):
    """sft.global_batch_size=3 passes the schema but the SFT stage refuses it (not a multiple of the
    micro-batch): the finished SFT model and manifest must still be there."""
    sft = finished_copy / "round-1" / "sft"
    before = {k: v for k, v in snapshot(finished_copy).items() if k.startswith("round-1/sft/")}
    assert (sft / "model" / "config.json").exists()
    assert main(["run", str(finished_copy / "config.yaml"), "sft.global_batch_size=3"]) == 2
    assert "sft.global_batch_size" in capsys.readouterr().err
    after = {k: v for k, v in snapshot(finished_copy).items() if k.startswith("round-1/sft/")}
    assert after == before
    assert main(["status", str(finished_copy)]) == 0
    assert "partial" not in capsys.readouterr().out


# --- one line, the right exit code ---------------------------------------------------------------

@pytest.fixture()
def tiny_config_file(tmp_path) -> Path:
    assert main(["init", str(tmp_path / "run"), "--preset", "tiny"]) == 0
    return tmp_path / "run" / "config.yaml"


def non_utf8_jsonl(path: Path) -> Path:
    path.write_bytes(b'{"instruction": "Name a colour.", "response": "Red."}\n'
                     b'{"instruction": "Caf\xe9 or tea?", "response": "Tea."}\n')
    return path


@pytest.mark.parametrize("key", ["data.seeds", "data.reference", "eval.prompts"])
def test_a_non_utf8_input_file_is_one_line_naming_file_and_line(tiny_config_file, tmp_path, key, capsys):
    bad = non_utf8_jsonl(tmp_path / "bad.jsonl")
    assert main(["run", str(tiny_config_file), f"{key}={bad}"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(bad) in err[0] and "line 2" in err[0] and "UTF-8" in err[0]


def test_a_non_utf8_question_file_is_refused_before_any_stage(tiny_config_file, tmp_path, capsys):
    bad = non_utf8_jsonl(tmp_path / "questions.jsonl")
    assert main(["run", str(tiny_config_file), f"eval.questions={bad}", "eval.judge=tiny-random:0"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(bad) in err[0] and "UTF-8" in err[0]
    assert not (tiny_config_file.parent / "round-1").exists()


def test_a_non_utf8_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"name: caf\xe9\n")
    assert main(["run", str(config)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(config) in err[0] and "UTF-8" in err[0]


def test_a_directory_where_a_file_is_expected_is_one_line(tiny_config_file, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(tiny_config_file), f"data.seeds={empty}"]) == 2
    assert main(["run", str(empty)]) == 2  # a folder as the config file
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 2 and all(str(empty) in line for line in err)


def test_a_run_dir_that_is_a_file_is_one_line(tiny_config_file, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("x")
    assert main(["run", str(tiny_config_file), "--run-dir", str(file)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(file) in err[0] and "not a directory" in err[0]


def test_a_huge_seed_record_is_refused_by_rule(tiny_config_file, tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Summarise: " + "word " * 10_000}) + "\n")
    assert main(["run", str(tiny_config_file), f"data.seeds={seeds}"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "data.max_seed_chars" in err[0] and "line 1" in err[0]
    # The limit is a key: raised, the record is accepted (the run stops at the first stage here).
    from montessori.readers import read_seeds
    assert len(read_seeds(str(seeds), max_chars=100_000).records) == 1


def test_status_on_an_empty_or_missing_directory_exits_2(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert len(error_lines(capsys.readouterr().err)) == 2


def test_eval_max_examples_0_names_the_flag_not_the_reference_file(capsys):
    assert main(["eval", "tiny-random:1", "--max-examples", "0", "--out", "unused"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "max_examples" in err[0] and "reference.jsonl" not in err[0]


def toy_config(monkeypatch, tmp_path, target: str) -> Path:
    """A one-stage method whose stage is `target` (the runner, lock and CLI are the real ones)."""
    stages = (Stage("instructions", target, ("generation.num_prompts",)),)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", ("instructions",))
    monkeypatch.setattr(pipeline, "preflight", lambda config, stages=None: None)
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text(load_preset("tiny").to_yaml())
    return config


def full_disk_stage(ctx):
    with JsonlAppender(ctx.stage.file("records.jsonl")) as out:
        for i in range(10_000):
            out.append({"id": str(i), "text": "x" * 1000})


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A real 256 KiB file system (tmpfs; needs root), unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    import logging
    for handler in logging.getLogger("montessori").handlers:  # the run's log file is open in there
        handler.close()
    subprocess.run(["umount", str(mount)], check=True)


def failing_stage_with_a_progress_bar(ctx):
    from tqdm.auto import tqdm
    bar = tqdm(total=10, desc="generating")
    bar.update(3)
    from montessori.errors import InputError
    raise InputError("a record the stage cannot use", file="seeds.jsonl", record="line 4")


def test_a_full_disk_is_one_line_naming_path_and_reason_exit_1(monkeypatch, tmp_path, small_tmpfs, capsys):
    config = toy_config(monkeypatch, tmp_path, "test_reliability:full_disk_stage")
    run = small_tmpfs / "run"
    assert main(["run", str(config), "--run-dir", str(run)]) == 1
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: {run / 'round-1' / 'instructions' / 'records.jsonl'}: No space left on device"]


def test_a_read_only_disk_is_one_line_naming_path_and_reason_exit_1(monkeypatch, tmp_path, small_tmpfs, capsys):
    config = toy_config(monkeypatch, tmp_path, "test_reliability:full_disk_stage")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert main(["run", str(config), "--run-dir", str(small_tmpfs / "run")]) == 1
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: {small_tmpfs / 'run'}: Read-only file system"]


def test_the_error_line_does_not_share_a_line_with_a_progress_bar(monkeypatch, tmp_path, capsys):
    config = toy_config(monkeypatch, tmp_path, "test_reliability:failing_stage_with_a_progress_bar")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.split("\n") if "a record the stage cannot use" in line]
    assert line.startswith("error: seeds.jsonl, line 4")


def test_an_import_error_inside_a_stage_module_shows_its_cause(tmp_path, monkeypatch):
    (tmp_path / "stage_needing_a_package.py").write_text("import package_that_is_not_installed\n\n"
                                                         "def run(ctx):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MontessoriError, match="package_that_is_not_installed"):
        load_function("x", "stage_needing_a_package:run")
    with pytest.raises(NotImplementedError):  # the stage's own module is missing: not implemented
        load_function("x", "montessori.no_such_stage_module:run")


# --- decode-safe append-only files -----------------------------------------------------------------

TORN = '{"id": "a", "instruction": "Name a colour.", "response": "Red."}\n'.encode() + \
    '{"id": "b", "instruction": "Café'.encode()[:-1]  # cut inside the two bytes of "é"


def test_a_torn_tail_inside_a_multibyte_character_is_dropped(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(TORN)
    assert [r["id"] for r in read_jsonl(path)] == ["a"]
    with JsonlAppender(path) as out:  # resuming rewrites the file without the tail
        out.append({"id": "b", "instruction": "Café?", "response": "Tea."})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]


def test_status_never_crashes_on_a_damaged_run(finished_copy, capsys):
    (finished_copy / "round-1" / "dpo" / "manifest.json").write_bytes(b'{"stage": "dp\xff')
    (finished_copy / "round-1" / "sft" / "manifest.json").unlink()
    (finished_copy / "round-1" / "sft" / "metrics.jsonl").write_bytes(TORN)
    (finished_copy / "round-x").mkdir()
    assert main(["status", str(finished_copy)]) == 0
    out = capsys.readouterr().out
    assert "damaged" in out and "partial" in out
