"""The influence stage's unit of work: a Scorer built once from the saved warm-up folder, then given
lists of candidates. `run_influence` hands `partial(build_scorer, ...)` and `"score"` to `ctx.map`,
so the same Scorer runs in this process (one call on every candidate) or on each worker of a pool
(executors.local, executors.ray), and a value does not depend on where, or on how many workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from montessori.context import WORKER_GPUS
from montessori.influence.settings import InfluenceSettings
from montessori.models.batching import encode_pairs
from montessori.records import InfluenceResult, Pair


class Scorer:
    """An InfluenceEngine plus the tokenizer that encodes pairs for it; scores a list of pairs
    (or of already encoded batching.Example, as bench/scale.py sends)."""

    def __init__(self, engine, tokenizer=None, max_length: int | None = None, die_once: str | None = None):
        self.engine, self.tokenizer, self.max_length, self.die_once = engine, tokenizer, max_length, die_once

    def score(self, items: list) -> Iterator[InfluenceResult]:
        """Each item's result, in order, as soon as it is ready (the engine keeps its own pipeline full)."""
        examples = [encode_pairs(self.tokenizer, [item], self.max_length)[0] if isinstance(item, Pair) else item
                    for item in items]
        for result in self.engine.score_many(examples):
            if self.die_once and _claim(self.die_once):
                os._exit(17)  # fault injection (tests): the process vanishes mid-task, as on a node loss
            yield result


def _claim(flag: str) -> bool:
    """True for the one process that creates `flag` (atomic), so a single worker dies, once."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def build_scorer(warmup_dir: str, reference: list[Pair], settings: InfluenceSettings,
                 die_once: str | None = None) -> Scorer:
    """The engine `compute_influence` builds, from the saved warm-up folder (same encoding, same
    padding id, same precision), so values equal its values."""
    from montessori.influence.engine import AdamWState, InfluenceEngine
    from montessori.influence.warmup import load_warmup
    if int(os.environ.get(WORKER_GPUS, "0")) > 1:
        # An 8B student's fp32 θ, m, v and shadow (16 bytes a parameter) fit one 141 GB H200; a scorer
        # sharded over a group of GPUs is not implemented.
        raise ValueError("an influence worker uses one GPU; set distributed.gpus_per_worker=1 (more is for "
                         "generation's tensor-parallel vLLM engines)")
    model, tokenizer, state = load_warmup(Path(warmup_dir), settings.device)
    if settings.compile == "on":  # the forward passes; the engine compiles the rest itself
        model.base_model.compile(dynamic=True)
    engine = InfluenceEngine(model, AdamWState.from_state_dict(state, list(model.parameters())),
                             encode_pairs(tokenizer, reference, settings.reference_max_length or settings.max_length),
                             pad_id=tokenizer.pad_token_id or 0, settings=settings)
    del state  # the engine keeps the moments it needs
    return Scorer(engine, tokenizer, settings.max_length, die_once)
