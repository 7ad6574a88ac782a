"""The warm-up / stable / decay (WSD) learning-rate schedule of teacher DPO and student SFT
(docs/method.md, steps 7 and 9).

Over T optimizer steps: linear warm-up to the peak lr over the first `warmup` share, constant for the
`stable` share, then linear decay over the rest, reaching `min_lr` as the run ends. The factor of
step k (0-based) is the lr used by optimizer step k+1: the first step already learns (lr/W, not 0),
and no step of a short run is spent at lr 0 or at min_lr.

Why not `transformers.get_wsd_schedule` (same signature from the 5.17 floor to 5.25): with
`decay_type="linear"` and `min_lr_ratio=min_lr/lr` its stable and decay steps equal these, but its
warm-up starts at min_lr (step k gets min_lr + (lr - min_lr) k/W), so the first optimizer step of
every run with a warm-up learns at ~min_lr (with W = 1, its whole warm-up). tests/test_schedules.py
holds both facts.
"""

from __future__ import annotations

import torch


def wsd_phases(total_steps: int, warmup: float, stable: float) -> tuple[int, int, int]:
    """(warm-up, stable, decay) step counts; decay takes the rounding remainder."""
    w = round(total_steps * warmup)
    s = round(total_steps * stable)
    s = min(s, total_steps - w)
    return w, s, total_steps - w - s


def wsd_factor(step: int, total_steps: int, warmup: float, stable: float, min_ratio: float) -> float:
    w, s, d = wsd_phases(total_steps, warmup, stable)
    if step < w:
        return (step + 1) / w
    if step < w + s or d == 0:
        return 1.0
    progress = min(1.0, (step - w - s) / d)
    return 1.0 - (1.0 - min_ratio) * progress


def wsd_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, lr: float, min_lr: float,
                  warmup: float = 0.1, stable: float = 0.5) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: wsd_factor(k, total_steps, warmup, stable, min_ratio))


class WSDMixin:
    """Mix into a transformers Trainer: its scheduler becomes WSD with the ratios in `self.wsd`."""

    wsd: dict  # {"warmup": 0.1, "stable": 0.5, "min_lr": 1e-9}

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = wsd_scheduler(optimizer or self.optimizer, num_training_steps,
                                              lr=self.args.learning_rate, min_lr=self.wsd["min_lr"],
                                              warmup=self.wsd["warmup"], stable=self.wsd["stable"])
            self._created_lr_scheduler = True
        return self.lr_scheduler
