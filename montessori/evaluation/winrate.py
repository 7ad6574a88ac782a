"""Pairwise win rate (AlpacaEval-style), its length-controlled version, and single-answer grading.

Every pair is judged twice, A first then B first, and the two verdicts are averaged: a judge that
always prefers whichever answer it reads first gives exactly 0.5, so position bias cancels instead
of leaking into the win rate. Hard verdicts (1/0) that disagree between the two orders are a tie,
counted as half a win.

Length control (AlpacaEval 2.0 LC): judges like long answers, so a student can buy win rate with
verbosity. We regress the per-prompt preference on the length difference,
    logit P(A better) = θ0 + θ1 · tanh((len_A - len_B) / std(len_A - len_B)),
and report sigmoid(θ0): the win rate the judge would give at equal lengths. AlpacaEval's GLM also
has an instruction-difficulty term; with two students and one baseline it adds nothing to θ0.
Intervals are bootstrap 95% intervals over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from montessori.evaluation.answers import Conversation
from montessori.evaluation.judge import Judge
from montessori.store import JsonlAppender


@dataclass
class Judgement:
    id: str
    a_first: float  # P(A better) with A shown first
    b_first: float  # P(B better) with B shown first
    len_a: int  # characters
    len_b: int

    @property
    def preference(self) -> float:
        """P(A better), position bias averaged out."""
        return 0.5 * (self.a_first + 1.0 - self.b_first)


def judge_pairs(judge: Judge, conversations: Sequence[Conversation], answers_a: dict[str, list[str]],
                answers_b: dict[str, list[str]], cache_file: Path | None = None,
                progress: bool = False) -> list[Judgement]:
    """Judge A's against B's answer to each prompt's first turn, in both orders (resumable by prompt id)."""
    appender = JsonlAppender(cache_file) if cache_file is not None else None
    done = {r["id"]: Judgement(**r) for r in (appender.records if appender else [])}
    items = conversations
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(conversations, desc=f"judge {getattr(judge, 'name', '')}", unit="pair", leave=False)
    try:
        for c in items:
            if c.id in done:
                continue
            a, b = answers_a[c.id][0], answers_b[c.id][0]
            j = Judgement(c.id, judge.prefer(c.turns[0], a, b), judge.prefer(c.turns[0], b, a), len(a), len(b))
            done[c.id] = j
            if appender is not None:
                appender.append(asdict(j))
    finally:
        if appender is not None:
            appender.close()
    return [done[c.id] for c in conversations]


def _interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def length_feature(len_a: np.ndarray, len_b: np.ndarray) -> np.ndarray:
    diff = (len_a - len_b).astype(np.float64)
    std = diff.std()
    return np.tanh(diff / std) if std > 0 else np.zeros_like(diff)


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2, iterations: int = 50) -> np.ndarray:
    """(θ0, θ1) of logit P = θ0 + θ1·x for soft labels y in [0, 1], by Newton's method (IRLS).

    A small ridge on θ1 keeps it finite when the judge follows length perfectly (separable data)."""
    X = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    penalty = np.diag([0.0, ridge])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(X @ theta)))
        grad = X.T @ (y - p) - penalty @ theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return theta


def lc_win_rate(pref: np.ndarray, x: np.ndarray) -> float:
    theta = fit_logistic(x, pref)
    return float(100.0 / (1.0 + np.exp(-theta[0])))


def win_rate(judgements: Sequence[Judgement], *, samples: int = 1000, seed: int = 0) -> dict:
    """Win rate of A over B in percent (ties half), length-controlled win rate, bootstrap intervals."""
    pref = np.array([j.preference for j in judgements], dtype=np.float64)
    x = length_feature(np.array([j.len_a for j in judgements]), np.array([j.len_b for j in judgements]))
    idx = np.random.default_rng(seed).integers(0, len(pref), size=(samples, len(pref)))
    boot_wr = 100.0 * pref[idx].mean(axis=1)
    boot_lc = np.array([lc_win_rate(pref[i], x[i]) for i in idx])
    wr_low, wr_high = _interval(boot_wr)
    lc_low, lc_high = _interval(boot_lc)
    first = np.array([j.a_first for j in judgements] + [j.b_first for j in judgements])
    return {
        "win_rate": float(100.0 * pref.mean()), "win_rate_low": wr_low, "win_rate_high": wr_high,
        "lc_win_rate": lc_win_rate(pref, x), "lc_win_rate_low": lc_low, "lc_win_rate_high": lc_high,
        "wins": int((pref > 0.5).sum()), "ties": int((pref == 0.5).sum()), "losses": int((pref < 0.5).sum()),
        # How often the judge sided with the answer it read first (0.5 = no position bias).
        "first_position_rate": float(first.mean()),
        "mean_length_a": float(np.mean([j.len_a for j in judgements])),
        "mean_length_b": float(np.mean([j.len_b for j in judgements])),
        "prompts": len(judgements),
    }


# ---------------------------------------------------------------------------------------------
# Single-answer grading (MT-Bench style)


def grade_answers(judge: Judge, conversations: Sequence[Conversation], answers: dict[str, list[str]],
                  cache_file: Path | None = None, progress: bool = False) -> list[dict]:
    """One 1-10 grade per turn; turn k is judged with the conversation so far in the question."""
    appender = JsonlAppender(cache_file) if cache_file is not None else None
    done = {r["id"]: r for r in (appender.records if appender else [])}
    items = conversations
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(conversations, desc=f"grade {getattr(judge, 'name', '')}", unit="question", leave=False)
    try:
        for c in items:
            for k, turn in enumerate(c.turns):
                rid = f"{c.id}/turn-{k + 1}"
                if rid in done:
                    continue
                history = "".join(f"[User]\n{c.turns[i]}\n[Assistant]\n{answers[c.id][i]}\n\n" for i in range(k))
                question = f"{history}[User]\n{turn}" if history else turn
                reference = c.references[k] if k < len(c.references) else None
                score = judge.grade(question, answers[c.id][k], reference)
                record = {"id": rid, "question_id": c.id, "turn": k + 1, "category": c.category, "score": score}
                done[rid] = record
                if appender is not None:
                    appender.append(record)
    finally:
        if appender is not None:
            appender.close()
    return [done[f"{c.id}/turn-{k + 1}"] for c in conversations for k in range(len(c.turns))]


def grade_summary(grades: Sequence[dict], *, samples: int = 1000, seed: int = 0) -> dict:
    scores = np.array([g["score"] for g in grades if g["score"] is not None], dtype=np.float64)
    out = {"graded": int(scores.size), "unparsed": sum(g["score"] is None for g in grades)}
    if scores.size == 0:
        return out | {"score": float("nan"), "score_low": float("nan"), "score_high": float("nan")}
    idx = np.random.default_rng(seed).integers(0, scores.size, size=(samples, scores.size))
    low, high = _interval(scores[idx].mean(axis=1))
    out |= {"score": float(scores.mean()), "score_low": low, "score_high": high}
    for turn in sorted({g["turn"] for g in grades}):
        values = [g["score"] for g in grades if g["turn"] == turn and g["score"] is not None]
        out[f"score_turn_{turn}"] = float(np.mean(values)) if values else float("nan")
    return out
