"""Data-utility scorers for the paper's ablation: rank candidates by something cheaper than influence.

Each scorer returns one InfluenceResult per candidate pair (same id), so the preferences stage ranks them
exactly as it ranks influence values; `estimator` says which signal it was.

  loss   the student's own response-token loss on the candidate (token mean). Larger = the student
         knows it less. Always positive: use `preferences.rule: rank`.
  judge  a judge model's 1-10 grade of the instruction/response, centred at 5.5 so that the `sign`
         rule reads "above the scale's middle" as chosen.

The paper finds local influence beats both; these exist to reproduce that comparison.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from montessori.evaluation.judge import Judge
from montessori.evaluation.loss import example_losses
from montessori.records import InfluenceResult, Pair

JUDGE_CENTRE = 5.5


def loss_utility(model, tokenizer, pairs: Sequence[Pair], *, batch_size: int = 8,
                 max_length: int | None = 1024) -> list[InfluenceResult]:
    started = time.perf_counter()
    losses = example_losses(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    each = (time.perf_counter() - started) / max(1, len(pairs))
    out = []
    for e in losses:
        if e.tokens == 0:
            out.append(InfluenceResult(e.id, None, None, None, status="empty_response", estimator="loss"))
        else:
            out.append(InfluenceResult(e.id, e.loss_sum / e.tokens, None, None, estimator="loss", seconds=each))
    return out


def judge_utility(judge: Judge, pairs: Sequence[Pair]) -> list[InfluenceResult]:
    out = []
    for p in pairs:
        started = time.perf_counter()
        score = judge.grade(p.instruction, p.response)
        seconds = time.perf_counter() - started
        if score is None:
            out.append(InfluenceResult(p.id, None, None, None, status="unparsed_grade", estimator="judge",
                                       seconds=seconds))
        else:
            out.append(InfluenceResult(p.id, score - JUDGE_CENTRE, None, None, estimator="judge", seconds=seconds))
    return out
