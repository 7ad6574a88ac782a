"""Local data influence of a candidate pair on a student (docs/method.md, steps 3-5).

Library API (usable from a notebook):
    from montessori.influence import compute_influence, load_warmup
    model, tokenizer, opt_state = load_warmup("RUN/round-1/warmup")
    results = compute_influence(model, opt_state, candidates, reference, tokenizer=tokenizer)  # linear
    results = compute_influence(model, opt_state, candidates, reference, tokenizer=tokenizer, estimator="exact")

core.py is the definition in a few readable lines; engine.py and fast.py compute it at scale.
"""

from montessori.influence.engine import AdamWState, InfluenceEngine, compute_influence, reference_loss
from montessori.influence.settings import InfluenceSettings
from montessori.influence.warmup import load_warmup, save_warmup, split_pairs, train_warmup

__all__ = ["AdamWState", "InfluenceEngine", "InfluenceSettings", "compute_influence", "reference_loss",
           "load_warmup", "save_warmup", "split_pairs", "train_warmup"]
