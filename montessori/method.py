"""The method: the stages of one round, in the order they run (docs/method.md).

Each entry is a stage function; its `@stage(...)` declaration beside it says which config keys it
reads, which stages' output it reads, which files and models it needs. The runner
(montessori/pipeline.py) runs these, rounds times, skipping what is up to date.
"""

from __future__ import annotations

from montessori.config import Config
from montessori.context import Stage
from montessori.evaluation.stage import run_eval
from montessori.generation.stage import run_dataset, run_instructions, run_responses
from montessori.influence.mechanism import run_mechanism
from montessori.influence.stage import run_influence
from montessori.influence.warmup import run_warmup
from montessori.preferences.stage import run_preferences
from montessori.training.dpo import run_dpo
from montessori.training.sft import run_sft

STAGES: tuple[Stage, ...] = tuple(fn.stage for fn in (
    run_instructions,  # 1. the teacher writes instructions, prompted with seed and synthetic examples
    run_responses,     # 2. and answers them: the probing candidates
    run_warmup,        # 3. the student is warmed up on a few candidates; its AdamW state is kept
    run_influence,     # 4. one AdamW step on each candidate: the change of the student's reference loss
    run_preferences,   # 5. pairs of the same prompt: the more helpful instruction is preferred
    run_dpo,           # 6. the teacher learns to prefer writing helpful data
    run_mechanism,     # 7. (a check) does the trained teacher write higher-influence data?
    run_dataset,       # 8. the trained teacher writes the student's training set
    run_sft,           # 9. the base student is fine-tuned on it: the next round's student
    run_eval,          # 10. the student on held-out prompts
))
STAGE_NAMES = tuple(s.name for s in STAGES)


def stages_for(config: Config) -> list[Stage]:
    """The stages `config.method` runs: all of them, or the Self-Instruct baseline's (the same teacher
    writes the training set; no influence, no DPO)."""
    if config.method == "self-instruct":
        return [s for s in STAGES if s.baseline]
    return list(STAGES)
