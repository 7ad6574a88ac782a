"""Every config key a stage reads is declared by that stage (issue 25).

A stage's fingerprint is the values of the keys its `@stage(keys=...)` declares: a key it reads but
does not declare would let a changed value reuse a stale result. Here every stage runs under the real
runner with a config that records each value read through it (`Reads`), on the tiny preset for two
rounds (round 2 reads last round's teacher and student); each read must be covered by a key the same
stage declares, or by one of the keys no output depends on (`keys.NOT_FINGERPRINTED`). A toy stage
reading a key it does not declare shows the check fails where it should.
"""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel

from montessori.config import load_preset
from montessori.context import Stage, StageContext
from montessori.keys import NOT_FINGERPRINTED
from montessori.method import STAGES
from montessori.pipeline import run_pipeline

# Methods through which a whole (sub)config is read at once: the read is of every key under it.
WHOLE = frozenset({"model_dump", "model_dump_json", "model_copy", "to_yaml", "keys_dump"})


class Reads:
    """A read-only view of a config (or a section of it) that adds the dotted key of every value read
    through it to `log`. Sections come back as views too, so `cfg.generation.instructions.top_p` logs
    `generation.instructions.top_p`; `config.value(key)` logs `key`."""

    def __init__(self, obj: BaseModel, prefix: str, log: set[str]):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name: str):
        value = getattr(self._obj, name)
        key = self._prefix + name
        if isinstance(value, BaseModel):
            return Reads(value, key + ".", self._log)
        if name == "value" and callable(value):
            def read(dotted: str):
                self._log.add(self._prefix + dotted)
                return value(dotted)
            return read
        if name in WHOLE:
            self._log.add(self._prefix.rstrip(".") or "*")
            return value
        if callable(value) or name.startswith("_") or name in ("model_fields", "LATER_KEYS"):
            return value
        self._log.add(key)
        return value

    def __setattr__(self, name, value):
        raise AttributeError(f"a stage does not change its config ({self._prefix}{name})")


def covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def recording_executor(reads: dict[str, set[str]]):
    def run(stage: Stage, ctx: StageContext):
        log = reads.setdefault(stage.name, set())
        return stage.function(dataclasses.replace(ctx, config=Reads(ctx.config, "", log)))
    return run


def undeclared(reads: dict[str, set[str]], stages) -> dict[str, list[str]]:
    by_name = {s.name: s for s in stages}
    out = {}
    for name, keys in reads.items():
        bad = sorted(k for k in keys if not covered(k, by_name[name].keys + NOT_FINGERPRINTED))
        if bad:
            out[name] = bad
    return out


def test_every_key_and_input_a_stage_reads_is_declared_by_that_stage(tmp_path, monkeypatch):
    reads: dict[str, set[str]] = {}
    inputs: dict[str, set[tuple[int, str]]] = {}  # stage -> (rounds back, stage read) through ctx.input
    read_input = StageContext.input

    def recorded_input(self, name, round=None):
        inputs.setdefault(self.dir.stage, set()).add((self.round - (self.round if round is None else round), name))
        return read_input(self, name, round)

    monkeypatch.setattr(StageContext, "input", recorded_input)
    config = load_preset("tiny", ["rounds=2"])
    run_pipeline(config, tmp_path / "run", progress=False, executor=recording_executor(reads))
    assert set(reads) == {s.name for s in STAGES}, "every stage ran under the recording executor"
    assert all(reads[s.name] for s in STAGES), "every stage read its config through the view"
    assert undeclared(reads, STAGES) == {}
    by_name = {s.name: s for s in STAGES}
    undeclared_inputs = {name: sorted(f"{back} round(s) back: {read}" for back, read in got
                                      if read not in (by_name[name].inputs if back == 0 else by_name[name].round_inputs))
                         for name, got in inputs.items()}
    assert {k: v for k, v in undeclared_inputs.items() if v} == {}


def reads_an_undeclared_key(ctx):
    return {"lr": ctx.config.sft.lr, "prompts": ctx.config.generation.num_prompts}


def test_a_stage_reading_a_key_it_does_not_declare_fails_the_check(tmp_path, monkeypatch):
    from montessori import method, pipeline
    toy = Stage("instructions", reads_an_undeclared_key, ("generation.num_prompts",))
    monkeypatch.setattr(method, "STAGES", (toy,))
    monkeypatch.setattr(method, "STAGE_NAMES", ("instructions",))
    monkeypatch.setattr(pipeline, "preflight", lambda config, stages=None: None)
    reads: dict[str, set[str]] = {}
    run_pipeline(load_preset("tiny"), tmp_path / "run", progress=False, executor=recording_executor(reads))
    assert reads == {"instructions": {"sft.lr", "generation.num_prompts"}}
    assert undeclared(reads, (toy,)) == {"instructions": ["sft.lr"]}


def test_a_whole_section_read_counts_as_every_key_under_it():
    log: set[str] = set()
    view = Reads(load_preset("tiny"), "", log)
    view.generation.instructions.model_dump()
    assert view.value("sft.lr") > 0 and view.models.teacher
    assert log == {"generation.instructions", "sft.lr", "models.teacher"}
    assert not covered("generation.instructions", ("generation.instructions.top_p",))
    assert covered("generation.instructions.top_p", ("generation.instructions",))
