"""Reference-answer loss: how well a student predicts trusted answers. Judge-free, cheap, the default metric.

The loss is the token mean of the response-token cross-entropy over the whole set (Σ token losses /
Σ response tokens, accumulated in fp64), the same quantity as the influence stage's L_ref. It does
not depend on the batch size. We also report the example mean (each example weighs the same,
whatever its length) and the perplexity exp(token mean). Intervals are bootstrap intervals over
examples: the unit that was sampled is the prompt, not the token.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from montessori.models.batching import Example, encode_pairs, length_batches, row_loss_sums
from montessori.records import Pair


@dataclass
class ExampleLoss:
    id: str
    loss_sum: float  # Σ of this example's response-token losses (nats)
    tokens: int


def example_losses(model, tokenizer, pairs: Sequence[Pair], *, batch_size: int = 8, max_length: int | None = 1024,
                   progress: bool = False) -> list[ExampleLoss]:
    """Per-example response-token loss sums, in the order of `pairs`."""
    examples = encode_pairs(tokenizer, pairs, max_length)
    return score_examples(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id, progress=progress)


@torch.no_grad()
def score_examples(model, examples: Sequence[Example], *, batch_size: int = 8, pad_id: int = 0,
                   progress: bool = False) -> list[ExampleLoss]:
    """Loss sums of already encoded examples (input_ids, labels with -100 on the prompt), in input order."""
    device = next(model.parameters()).device
    ordered = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = length_batches([examples[i] for i in ordered], batch_size, pad_id, device)
    was_training = model.training
    model.eval()
    sums: list[tuple[float, int]] = []
    iterator = batches
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(batches, desc="reference loss", unit="batch", leave=False)
    for batch in iterator:
        sums.extend(row_loss_sums(model, batch))
    model.train(was_training)
    out: list[ExampleLoss | None] = [None] * len(examples)
    for pos, (s, n) in zip(ordered, sums):
        out[pos] = ExampleLoss(examples[pos].id, s, n)
    return out


def token_mean(losses: Sequence[ExampleLoss]) -> float:
    tokens = sum(e.tokens for e in losses)
    return math.fsum(e.loss_sum for e in losses) / tokens if tokens else float("nan")


def _arrays(losses: Sequence[ExampleLoss]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([e.loss_sum for e in losses], dtype=np.float64),
            np.array([e.tokens for e in losses], dtype=np.float64))


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def summarize(losses: Sequence[ExampleLoss], *, samples: int = 1000, seed: int = 0) -> dict:
    """Token mean, example mean and perplexity, each with a bootstrap 95% interval over examples."""
    s, n = _arrays(losses)
    scored = n > 0  # an example whose prompt filled max_length has no response token
    per_example = np.where(scored, s / np.maximum(n, 1), np.nan)
    idx = bootstrap_indices(len(losses), samples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_token = s[idx].sum(1) / n[idx].sum(1)
    boot_example = np.array([np.nanmean(per_example[i]) if scored[i].any() else np.nan for i in idx])
    tm = token_mean(losses)
    tm_low, tm_high = _interval(boot_token)
    em_low, em_high = _interval(boot_example)
    return {
        "token_mean": tm, "token_mean_low": tm_low, "token_mean_high": tm_high,
        "example_mean": float(np.nanmean(per_example)) if scored.any() else float("nan"),
        "example_mean_low": em_low, "example_mean_high": em_high,
        "perplexity": math.exp(tm), "perplexity_low": math.exp(tm_low), "perplexity_high": math.exp(tm_high),
        "examples": len(losses), "tokens": int(n.sum()), "examples_without_tokens": int((~scored).sum()),
    }


def difference(a: Sequence[ExampleLoss], b: Sequence[ExampleLoss], *, samples: int = 1000, seed: int = 0) -> dict:
    """Token-mean loss of A minus B on the same examples (negative = A predicts the answers better),
    with a paired bootstrap interval: both students are resampled on the same examples.

    Also the example mean of the per-example differences (every example weighs the same), with its own
    paired interval: the token mean is dominated by long answers, and the two can disagree in sign
    (docs/experiments.md, issue 14's seeds 0 and 2)."""
    if [e.id for e in a] != [e.id for e in b]:
        raise ValueError("loss difference needs both students scored on the same examples in the same order")
    sa, na = _arrays(a)
    sb, nb = _arrays(b)
    idx = bootstrap_indices(len(a), samples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = sa[idx].sum(1) / na[idx].sum(1) - sb[idx].sum(1) / nb[idx].sum(1)
    low, high = _interval(boot)
    scored = (na > 0) & (nb > 0)
    per_example = np.where(scored, sa / np.maximum(na, 1) - sb / np.maximum(nb, 1), np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without a scored example: NaN, dropped
        boot_example = np.nanmean(per_example[idx], axis=1)
    ex_low, ex_high = _interval(boot_example)
    return {"token_mean_diff": token_mean(a) - token_mean(b), "low": low, "high": high,
            "a_better_fraction": float(np.mean(boot < 0)),
            "example_mean_diff": float(np.nanmean(per_example)) if scored.any() else float("nan"),
            "example_low": ex_low, "example_high": ex_high,
            "a_better_examples": float(np.mean(per_example[scored] < 0)) if scored.any() else float("nan")}


def reference_answer_loss(model, tokenizer, pairs: Sequence[Pair], *, batch_size: int = 8,
                          max_length: int | None = 1024, samples: int = 1000, seed: int = 0,
                          progress: bool = False) -> tuple[dict, list[ExampleLoss]]:
    """(summary, per-example losses) of one student on an instruction/response set."""
    losses = example_losses(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, progress=progress)
    return summarize(losses, samples=samples, seed=seed), losses


__all__ = ["ExampleLoss", "example_losses", "score_examples", "token_mean", "summarize", "difference",
           "reference_answer_loss"]
