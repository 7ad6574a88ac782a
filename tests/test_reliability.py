"""Issue 15's reproductions for the run directory: one writer, nothing deleted before everything is
checked, one line and the right exit code for every failure, decode-safe append-only files; issue 26's:
every bad value refused before the first stage (and a refused run writes nothing), every failure in one
line (docs/errors.md has the rules)."""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from montessori.context import Stage
from montessori.store import JsonlAppender, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run directory and its content hash (the log and the lock aside)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in ("montessori.log", ".lock")}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "Writing model shards:   0%|   | 0/1": not an error


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
    # issue 26: accepted up front, then a traceback (or NaN weights) once the stage ran, after the ones before
    "dpo.loss_type=bogus", "dpo.loss_type=exo_pair", "sft.lr=.inf", "dpo.beta=.inf", "warmup.eps=inf",
    "sft.warmup_ratio=0.9", "dpo.stable_ratio=0.6", "sft.global_batch_size=5",
    "generation.instructions.max_new_tokens=1000000000", "generation.responses.max_new_tokens=2048",
    "eval.max_new_tokens=100000", "data.seeds=myseeds", "data.reference=typo", "models.student=nobody/x",
])
def test_a_bad_value_is_refused_before_any_output_is_touched(finished_copy, override, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nobody/x: the offline check
    before = snapshot(finished_copy)
    assert not (finished_copy / "montessori.log").exists()
    assert main(["run", str(finished_copy / "config.yaml"), override]) == 2
    err = error_lines(capsys.readouterr().err)
    key = override.split("=")[0]
    assert len(err) == 1 and err[0].startswith("error:") and key in err[0]
    assert snapshot(finished_copy) == before
    assert not (finished_copy / "montessori.log").exists()  # not even a log line


def test_only_what_the_scheduled_stages_read_is_checked(finished_copy, capsys):
    """`--until responses` runs the teacher's stages only: a student that is not installed (yet) must not
    stop them, and the same student still refuses the whole run."""
    config = str(finished_copy / "config.yaml")
    assert main(["run", config, "models.student=./no/such/dir", "--until", "responses"]) == 0
    assert main(["run", config, "models.student=./no/such/dir"]) == 2
    assert "models.student" in capsys.readouterr().err


def test_a_failing_rerun_leaves_the_last_good_result(finished_copy, capsys):
    """sft.max_length=1 passes every check but the SFT stage finds no response token to train on: the
    finished SFT model and manifest must still be there."""
    sft = finished_copy / "round-1" / "sft"
    before = {k: v for k, v in snapshot(finished_copy).items() if k.startswith("round-1/sft/")}
    assert (sft / "model" / "config.json").exists()
    assert main(["run", str(finished_copy / "config.yaml"), "sft.max_length=1"]) == 1
    assert "sft.max_length" in capsys.readouterr().err
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
    assert main(["run", str(tiny_config_file), f"eval.questions={bad}", "eval.judge.model=tiny-random:0"]) == 2
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
    """A one-stage method whose stage is `target` ("module:function"; the runner, lock and CLI are the real ones)."""
    import importlib

    from montessori import method
    module, function = target.split(":")
    stages = (Stage("instructions", getattr(importlib.import_module(module), function), ("generation.num_prompts",)),)
    monkeypatch.setattr(method, "STAGES", stages)
    monkeypatch.setattr(method, "STAGE_NAMES", ("instructions",))
    monkeypatch.setattr(pipeline, "preflight", lambda config, stages=None: None)
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text(load_preset("tiny").to_yaml())
    return config


def full_disk_stage(ctx):
    with JsonlAppender(ctx.dir.file("records.jsonl")) as out:
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
    import gc
    import logging
    for handler in logging.getLogger("montessori").handlers:  # the run's log file is open in there
        handler.close()
    gc.collect()  # a failed writer's file, still held by its exception's frames
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # --lazy: also while a failed test holds a file


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


# --- issue 26: the config file itself ---------------------------------------------------------------

def yaml_alias_bomb(levels: int = 9) -> str:
    """1.8 KB that yaml.safe_load expands to 9**9 values (6.2 GB of memory, 44 s, a 2 GB error line)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, expected", [
    (yaml_alias_bomb(), "line 1: anchor &a0: anchors and aliases are not accepted"),
    ("sft: &schedule {lr: 1.0e-5}\ndpo: *schedule\n", "line 1: anchor &schedule"),
    ("name: " + "[" * 100 + "]" * 100 + "\n", "line 1: nested more than 32 levels deep"),
    ("# padding\n" * 120_000, "1200000 bytes, over the limit of 1048576 for a config"),
], ids=["alias-bomb", "one-alias", "deep", "large"])
def test_a_config_is_read_within_bounds(tmp_path, text, expected, capsys):
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text(text)
    start = time.monotonic()
    assert main(["run", str(config)]) == 2
    assert time.monotonic() - start < 10
    err = error_lines(capsys.readouterr().err)
    assert err == [err[0]] and err[0].startswith(f"error: {config}:") and expected in err[0] and len(err[0]) < 300
    assert [p.name for p in config.parent.iterdir()] == ["config.yaml"]


def test_what_montessori_writes_its_yaml_loader_reads_back(tiny_config):
    from montessori.config import config_from_dict
    from montessori.safe_yaml import dump, load
    words = ["image", "file"]
    text = dump({"eval": {"tasks": words}, "generation": {"banned_words": words}})  # one list, twice
    assert "&" not in text and "*" not in text  # yaml.safe_dump writes an anchor and an alias here
    assert load(text) == {"eval": {"tasks": words}, "generation": {"banned_words": words}}
    assert config_from_dict(load(tiny_config.to_yaml())) == tiny_config


def test_the_dpo_losses_are_the_ones_trl_computes():
    """The one list of dpo.loss_type values is read from TRL (not written here); each is a branch of the
    loss TRL's DPOTrainer computes, and exo_pair (it needs a label smoothing montessori never sets) is out."""
    import importlib.util

    from montessori.config import dpo_loss_types, load_preset
    trainer = Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "trainer" / "dpo_trainer.py"
    computed = set(re.findall(r'loss_type == "(\w+)"', trainer.read_text()))
    assert "sigmoid" in dpo_loss_types() and "exo_pair" not in dpo_loss_types()
    assert set(dpo_loss_types()) <= computed and computed - set(dpo_loss_types()) == {"exo_pair"}
    for loss in dpo_loss_types():
        assert load_preset("tiny", [f"dpo.loss_type={loss}"]).dpo.loss_type == loss


# --- issue 26: data files and model ids, before any stage --------------------------------------------

def test_a_data_file_that_cannot_be_read_is_one_line_before_any_stage(finished_copy, tmp_path, capsys):
    """A CSV cell over csv's default limit (a traceback), JSON nested 100000 deep (a RecursionError), a
    non-UTF-8 CSV (no file, line or field named): each one line naming file, line and field, nothing
    touched. A long reference answer is fine: reference records are cut to tokens."""
    big = tmp_path / "big.csv"
    big.write_text('instruction,answer\n"Summarise the text.","' + "word " * 40_000 + '"\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"instruction": "Name a colour.", "response": "Red."}\n' + "[" * 100_000 + "\n")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"instruction,answer\nName a colour.,Red.\nTea?,Caf\xe9\n")
    before = snapshot(finished_copy)
    config = str(finished_copy / "config.yaml")
    for override, expected in ((f"data.seeds={big}", f"data.seeds: {big}, line 2, field 'output': 200000 "
                                                     f"characters, over data.max_seed_chars=20000"),
                               (f"data.reference={deep}", f"data.reference: {deep}, line 2: JSON nested more "
                                                          f"than 100 levels deep"),
                               (f"eval.prompts={latin1}", f"eval.prompts: {latin1}, line 3, field 'answer': not "
                                                          f"UTF-8 text (byte 0xe9")):
        assert main(["run", config, override]) == 2
        err = error_lines(capsys.readouterr().err)
        assert err == [err[0]] and err[0].startswith(f"error: {expected}"), err
    assert snapshot(finished_copy) == before
    from montessori.config import load_config
    from montessori.preflight import preflight
    preflight(load_config(config, [f"data.reference={big}"]), {"influence"})  # accepted


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache, and no Hub: check_hub_model must decide from the cache alone."""
    from huggingface_hub import constants
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache: Path, repo: str, config: dict) -> None:
    """A model in the HF cache layout (refs/main -> snapshots/REV/config.json), as a download leaves it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text(json.dumps(config))


def test_a_hub_model_id_is_resolved_offline_from_the_local_cache(hub_cache):
    from montessori.errors import InputError
    from montessori.models.load import check_hub_model, context_length_of
    with pytest.raises(InputError) as err:
        check_hub_model("nobody/x", "models.student")
    assert str(err.value) == (f"models.student=nobody/x: not in the local Hugging Face cache ({hub_cache}), and "
                              f"HF_HUB_OFFLINE is set: download it first (hf download nobody/x) or give a local "
                              f"model directory")
    cache_model(hub_cache, "someone/cached", {"model_type": "llama", "max_position_embeddings": 512})
    check_hub_model("someone/cached", "models.student")  # no network asked
    assert context_length_of("someone/cached") == 512 and context_length_of("nobody/x") is None


def test_the_hub_is_asked_within_a_time_bound(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    from montessori.errors import InputError
    from montessori.models.load import check_hub_model
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *args, **kwargs: time.sleep(30))  # a silent Hub
    start = time.monotonic()
    with pytest.raises(InputError, match=r"models.student=nobody/x: not in the local Hugging Face cache .*, and "
                                         r"the Hub could not be reached \(no answer within 0.5 s\)"):
        check_hub_model("nobody/x", "models.student", timeout=0.5)
    assert time.monotonic() - start < 5

    class NotFound(RepositoryNotFoundError):
        def __init__(self):
            Exception.__init__(self, "404 Client Error: Repository Not Found for url: https://huggingface.co/api/...")

    def missing(*args, **kwargs):
        raise NotFound()
    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    with pytest.raises(InputError, match=r"^models.student=nobody/x: no such model on the Hugging Face Hub"):
        check_hub_model("nobody/x", "models.student")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *args, **kwargs: object())
    check_hub_model("somebody/exists", "models.student")


def test_max_new_tokens_is_held_to_the_context_of_a_gguf_model(tiny_config, tmp_path):
    """The context of a .gguf model is read from its header (no conversion): SmolLM2's is 8192."""
    from montessori.errors import InputError
    from montessori.models.load import NAMED_MODELS, named_gguf_path
    from montessori.preflight import check_generation_lengths
    gguf = named_gguf_path(NAMED_MODELS["smollm2"])
    if gguf is None:
        pytest.skip("the embedded model is not installed")
    tiny_config.models.teacher = str(gguf)
    tiny_config.generation.responses.max_new_tokens = 8191
    check_generation_lengths(tiny_config, {"responses"})
    tiny_config.generation.responses.max_new_tokens = 8192
    with pytest.raises(InputError, match=r"key 'generation.responses.max_new_tokens': 8192 new tokens do not fit "
                                         r"the context of models.teacher=.*\(8192 tokens"):
        check_generation_lengths(tiny_config, {"responses"})
    check_generation_lengths(tiny_config, {"sft"})  # only what the scheduled stages generate


# --- issue 26: a refused run writes nothing ------------------------------------------------------------

def test_a_refused_run_writes_no_folder_and_no_log_line(finished_copy, tmp_path, capsys):
    config = str(finished_copy / "config.yaml")
    new = tmp_path / "new-run"
    assert main(["run", config, "--run-dir", str(new), "data.seeds=missing.jsonl"]) == 2
    assert main(["run", config, "--run-dir", str(new), "--only", "dpo"]) == 2  # its input has not run there
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 2 and "data.seeds" in err[0] and "needs stage 'preferences' of round 1" in err[1]
    assert not new.exists()  # `status` called the folder left behind "not a run directory"

    from montessori.store import RunLock
    log = finished_copy / "montessori.log"
    log.write_text("the first run's log\n")
    before = snapshot(finished_copy)
    with RunLock(finished_copy):  # the first run, still running
        assert main(["run", config]) == 2
        assert main(["run", config, "sft.lr=.inf"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 2 and "in use by another montessori run" in err[0] and "sft.lr" in err[1]
    assert log.read_text() == "the first run's log\n" and snapshot(finished_copy) == before


def test_init_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["init", str(folder), "--preset", "tiny"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: {folder}: not empty (1 entries, e.g. 'notes.txt'); init writes a new run directory: "
                   f"give a new or empty folder, or use --force to write config.yaml there"]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert main(["init", str(folder), "--preset", "tiny", "--force"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"


# --- issue 26: the environment: one line naming the path and the OS's reason, exit 1 -------------------

def model_saving_stage(ctx):
    from transformers import AutoConfig, AutoModelForCausalLM

    from montessori.models.load import resolve_model_dir
    config = AutoConfig.from_pretrained(resolve_model_dir("tiny-random:0"))
    AutoModelForCausalLM.from_config(config).save_pretrained(ctx.dir.file("model"))  # 13 MB of safetensors


def optimizer_saving_stage(ctx):
    import torch
    torch.save({"exp_avg": torch.zeros(512, 512)}, ctx.dir.file("optimizer.pt"))  # 1 MB


@pytest.mark.parametrize("stage, written", [("test_reliability:model_saving_stage", "model/model.safetensors"),
                                            ("test_reliability:optimizer_saving_stage", "optimizer.pt")])
def test_a_full_disk_while_saving_a_model_is_one_line(monkeypatch, tmp_path, small_tmpfs, capsys, stage, written):
    """safetensors says it in a SafetensorError (a 31-line traceback), torch.save in a RuntimeError
    without the errno: both are the disk's, and the line names the file and the OS's reason."""
    config = toy_config(monkeypatch, tmp_path, stage)
    run = small_tmpfs / "run"
    assert main(["run", str(config), "--run-dir", str(run)]) == 1
    err = [line for line in error_lines(capsys.readouterr().err) if not PROGRESS_BAR.search(line)]
    assert err == [f"error: {run / 'round-1' / 'instructions' / written}: No space left on device"]


def file_write_stage(ctx):
    """A write() to a full disk: OSError(ENOSPC) without a file name, raised under an open file."""
    import errno as errno_

    class FullDisk:
        name = str(ctx.dir.file("metrics.jsonl"))

        def write(self, text):
            raise OSError(errno_.ENOSPC, os.strerror(errno_.ENOSPC))

    f = FullDisk()
    f.write("{}\n")


def bare_os_error_stage(ctx):
    import errno as errno_
    raise OSError(errno_.ENOSPC, os.strerror(errno_.ENOSPC))


@pytest.mark.parametrize("stage, named", [("test_reliability:file_write_stage", "round-1/instructions/metrics.jsonl"),
                                          ("test_reliability:bare_os_error_stage", "round-1/instructions")])
def test_an_os_error_without_a_file_name_names_the_file_or_the_stage(monkeypatch, tmp_path, capsys, stage, named):
    config = toy_config(monkeypatch, tmp_path, stage)
    assert main(["run", str(config)]) == 1
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: {config.parent / named}: No space left on device"]


@pytest.fixture()
def read_only_view(finished_copy, tmp_path):
    """The finished run seen through a read-only bind mount (needs root), unmounted afterwards."""
    view = tmp_path / "read-only-run"
    view.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(finished_copy), str(view)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a read-only bind mount needs root")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True, capture_output=True)
        yield view
    finally:
        subprocess.run(["umount", "--lazy", str(view)], check=True)


def test_report_on_a_read_only_run_says_where_else_to_write(read_only_view, finished_copy, tmp_path, capsys):
    before = snapshot(finished_copy)
    assert main(["report", str(read_only_view)]) == 1
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: {read_only_view}: Read-only file system: the report cannot be written into the run; "
                   f"write it elsewhere: montessori report {read_only_view} --out DIR"]
    out = tmp_path / "reports"
    assert main(["report", str(read_only_view), "--out", str(out)]) == 0
    assert (out / "report.html").read_text().startswith("<!doctype html>") and (out / "report.md").exists()
    assert snapshot(finished_copy) == before
