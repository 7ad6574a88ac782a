"""The WSD schedule against `transformers.get_wsd_schedule`: why the project keeps its own.

The library's linear WSD equals ours on every stable and decay step but starts its warm-up at min_lr,
so a run's first step would learn at ~0. If a transformers release changes that, the first test fails
and montessori/training/schedules.py can become the library call.
"""

from __future__ import annotations

import pytest
import torch
from transformers import get_wsd_schedule

from montessori.config import DPOConfig, SFTConfig
from montessori.training.schedules import wsd_phases, wsd_scheduler


def lrs(make, total: int, lr: float) -> list[float]:
    """The lr each of `total` optimizer steps uses."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("section", [DPOConfig(), SFTConfig()], ids=["dpo", "sft"])
@pytest.mark.parametrize("total", [10, 37, 100, 213])
def test_the_library_schedule_differs_only_in_the_warm_up(section, total):
    lr, min_lr = section.lr, section.min_lr
    w, s, d = wsd_phases(total, section.warmup_ratio, section.stable_ratio)
    ours = lrs(lambda o: wsd_scheduler(o, total, lr=lr, min_lr=min_lr, warmup=section.warmup_ratio,
                                       stable=section.stable_ratio), total, lr)
    library = lrs(lambda o: get_wsd_schedule(o, num_warmup_steps=w, num_decay_steps=d, num_training_steps=total,
                                             warmup_type="linear", decay_type="linear", min_lr_ratio=min_lr / lr),
                  total, lr)
    assert ours[w:] == pytest.approx(library[w:], rel=1e-12, abs=0)  # stable and decay: the same lr
    assert library[0] == pytest.approx(min_lr) and ours[0] == pytest.approx(lr / w)  # the first step
    assert all(o > t for o, t in zip(ours[:w], library[:w]))  # every warm-up step learns more with ours

