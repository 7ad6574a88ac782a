"""Each student's answers to a prompt set: generated once, cached as JSONL, reused by every judge.

The cache file is keyed by (student weights fingerprint, prompt set hash, decoding settings), so a
different judge never regenerates and a re-trained student never reuses stale answers. Answers are
appended per prompt and flushed: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from montessori.models.chat import prompt_text
from montessori.store import JsonlAppender


@dataclass
class Conversation:
    """One prompt of an evaluation set: its user turns (one for AlpacaEval-style sets, two for MT-Bench)."""
    id: str
    turns: list[str]
    category: str = ""
    references: list[str] = field(default_factory=list)  # trusted answers per turn, when the file has them


@dataclass
class DecodeSettings:
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int = 512
    batch_size: int = 8
    seed: int = 0

    def key(self) -> str:
        return f"t{self.temperature:g}-n{self.max_new_tokens}-s{self.seed}"


def prompt_set_hash(conversations: Sequence[Conversation]) -> str:
    payload = json.dumps([[c.id, c.turns] for c in conversations], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cache_path(cache_dir: Path, student_fingerprint: str, conversations: Sequence[Conversation],
               settings: DecodeSettings) -> Path:
    return Path(cache_dir) / f"{student_fingerprint}-{prompt_set_hash(conversations)}-{settings.key()}.jsonl"


@torch.no_grad()
def generate_turn(model, tokenizer, histories: Sequence[list[dict]], settings: DecodeSettings) -> list[str]:
    """One assistant reply per chat history, batched with left padding."""
    texts = [prompt_text(tokenizer, h) for h in histories]
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    sample = settings.temperature > 0
    kwargs = dict(do_sample=sample, temperature=settings.temperature, top_p=1.0) if sample \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def generate_answers(model, tokenizer, conversations: Sequence[Conversation], settings: DecodeSettings,
                     cache_file: Path | None = None, progress: bool = False) -> dict[str, list[str]]:
    """{conversation id: [answer per turn]}; answers already in `cache_file` are not generated again."""
    appender = JsonlAppender(cache_file) if cache_file is not None else None
    done = {r["id"]: r["answers"] for r in (appender.records if appender else [])}
    todo = [c for c in conversations if c.id not in done]
    torch.manual_seed(settings.seed)
    batches = [todo[i:i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
    if progress and batches:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="answers", unit="batch", leave=False)
    try:
        for batch in batches:
            histories: list[list[dict]] = [[] for _ in batch]
            answers: list[list[str]] = [[] for _ in batch]
            # Turn k of every conversation in the batch, then turn k+1 with the replies in the history.
            for k in range(max(len(c.turns) for c in batch)):
                live = [i for i, c in enumerate(batch) if k < len(c.turns)]
                for i in live:
                    histories[i].append({"role": "user", "content": batch[i].turns[k]})
                replies = generate_turn(model, tokenizer, [histories[i] for i in live], settings)
                for i, reply in zip(live, replies):
                    histories[i].append({"role": "assistant", "content": reply})
                    answers[i].append(reply)
            for c, a in zip(batch, answers):
                done[c.id] = a
                if appender is not None:
                    appender.append({"id": c.id, "turns": c.turns, "answers": a})
    finally:
        if appender is not None:
            appender.close()
    return {c.id: done[c.id] for c in conversations}


def student_answers(spec: str, conversations: Sequence[Conversation], settings: DecodeSettings, cache_dir: Path,
                    *, device: str = "auto", dtype: str = "auto", progress: bool = False) -> tuple[dict, Path]:
    """Load the student only when some answer is missing from its cache."""
    from montessori.evaluation.students import model_fingerprint
    path = cache_path(cache_dir, model_fingerprint(spec), conversations, settings)
    from montessori.store import read_jsonl
    cached = {r["id"] for r in read_jsonl(path)} if path.exists() else set()
    if all(c.id in cached for c in conversations):
        return generate_answers(None, None, conversations, settings, path), path
    from montessori.models import load_model
    model, tokenizer = load_model(spec, device=device, dtype=dtype)
    model.eval()
    answers = generate_answers(model, tokenizer, conversations, settings, path, progress)
    del model
    return answers, path


def conversations_from_pairs(pairs) -> list[Conversation]:
    """A single-turn conversation per instruction/response pair (the response is the reference)."""
    return [Conversation(p.id, [p.instruction], references=[p.response]) for p in pairs]


def read_questions(path: str | Path) -> list[Conversation]:
    """An MT-Bench question file: JSONL of {question_id, category, turns: [str, ...], reference: [str, ...]}.

    A line may instead hold a single-turn record (`instruction` + `output`/`response`, or `messages`),
    read the way `montessori.readers.read_pairs` reads it."""
    from montessori.errors import InputError
    from montessori.readers import _instruction_and_answer
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", file=path)
    out = []
    lines = path.read_text().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = dict(file=path, record=f"line {lineno}")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON ({err.msg})", **where) from None
        if not isinstance(row, dict):
            raise InputError(f"expected an object, got {type(row).__name__}", **where)
        if "turns" not in row:
            try:  # the single-turn shapes the project's readers accept
                instruction, inp, answer = _instruction_and_answer(row)
            except InputError as err:
                raise err.at(file=path, record=f"line {lineno}") from None
            if not instruction.strip():
                raise InputError("empty", field="instruction", **where)
            prompt = f"{instruction.strip()}\n\n{inp.strip()}" if inp.strip() else instruction.strip()
            out.append(Conversation(str(row.get("id", f"line-{lineno}")), [prompt], references=[answer] if answer else []))
            continue
        turns, refs = row["turns"], row.get("reference") or []
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise InputError("expected a non-empty list of non-empty strings", field="turns", **where)
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise InputError("expected a list of strings", field="reference", **where)
        qid = row.get("question_id", row.get("id", f"line-{lineno}"))
        out.append(Conversation(str(qid), turns, str(row.get("category", "")), refs))
    if not out:
        raise InputError("no questions", file=path)
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"duplicate question id {dup!r}", file=path, field="question_id")
    return out
