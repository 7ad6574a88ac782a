"""Examples, length batches, the response-token loss and the precision context: the one definition
of "the loss on response tokens" shared by warm-up, influence and evaluation.

An Example is one instruction/response pair as token ids, prompt positions masked (`encode_pairs`,
through `chat.encode_example`). Batches are right-padded and sorted by length. The loss functions
run the lm_head only on response positions, in chunks: prompt positions need no logits, and a full
(batch, length, vocab) fp32 logits tensor would be ~8 GB for Llama-3's vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from montessori.models.chat import IGNORE_INDEX, encode_example, user_turn
from montessori.records import Pair

PRECISIONS = ("float32", "tf32", "bfloat16")

LOGIT_CHUNK = 4096  # response positions per lm_head call: bounds the fp32 logits (4096 x vocab)


@contextmanager
def precision_context(precision: str, device: torch.device):
    """float32: true fp32 matmuls. tf32: TF32 tensor-core matmuls (CUDA only; a no-op on CPU).
    bfloat16: bf16 autocast over fp32 master weights."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens

    @property
    def num_targets(self) -> int:
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


def encode_pairs(tokenizer, pairs: Iterable[Pair], max_length: int | None) -> list[Example]:
    """Each pair as one user turn + its response, prompt tokens masked (the project-wide encoding)."""
    out = []
    for p in pairs:
        ids, labels = encode_example(tokenizer, user_turn(p.instruction), p.response, max_length=max_length)
        out.append(Example(p.id, ids, labels))
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def length_batches(examples: Sequence[Example], batch_size: int, pad_id: int, device) -> list[Batch]:
    """Sort by length and cut into batches (right-padded): similar lengths together, little padding."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    batches = []
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        width = len(chunk[-1].input_ids)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        batches.append(Batch(ids.to(device), mask.to(device), labels.to(device)))
    return batches


def _response_hidden(model, batch: Batch):
    """(hidden states at the positions that predict a response token, their targets, keep mask)."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              use_cache=False).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep], keep


def token_loss_sum(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of the batch's response-token cross-entropies in fp32, number of response tokens)."""
    h, y, _ = _response_hidden(model, batch)
    head = model.get_output_embeddings()
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), LOGIT_CHUNK):
        logits = head(h[i:i + LOGIT_CHUNK]).float()
        total = total + F.cross_entropy(logits, y[i:i + LOGIT_CHUNK], reduction="sum")
    return total, int(y.numel())


def row_loss_sums(model, batch: Batch) -> list[tuple[float, int]]:
    """Per row of the batch: (sum of its response-token cross-entropies in fp64, its response tokens)."""
    h, y, keep = _response_hidden(model, batch)
    rows = keep.nonzero()[:, 0]
    head = model.get_output_embeddings()
    sums = torch.zeros(keep.shape[0], dtype=torch.float64, device=h.device)
    for i in range(0, y.numel(), LOGIT_CHUNK):
        token_losses = F.cross_entropy(head(h[i:i + LOGIT_CHUNK]).float(), y[i:i + LOGIT_CHUNK], reduction="none")
        sums.index_add_(0, rows[i:i + LOGIT_CHUNK], token_losses.double())
    return list(zip(sums.tolist(), keep.sum(dim=1).tolist()))
