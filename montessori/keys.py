"""Groups of config keys that several stages read, for their `@stage(keys=...)` declarations.

A stage's fingerprint is the values of the keys it declares (montessori/fingerprints.py); a key a stage
reads but does not declare would let a changed value reuse a stale result, which tests/test_rerun.py's
recorded-reads test catches. Keys only one stage reads are declared at that stage.
"""

from __future__ import annotations

TEACHER = ("models.teacher", "models.device", "models.dtype")
STUDENT = ("models.student", "models.device", "models.dtype")
BACKEND = ("generation.backend", "generation.engine", "generation.compile", "generation.base_url",
           "generation.batch_size")
SEEDS = ("data.seeds", "data.max_seeds", "data.lenient", "data.max_seed_chars")
# What the teacher is asked and which of its instructions are kept (instructions, mechanism and dataset).
PROMPTS = ("generation.prompt_style", "generation.examples_per_prompt", "generation.synthetic_per_prompt",
           "generation.instructions", "generation.min_chars", "generation.max_chars", "generation.banned_words",
           "generation.rouge_threshold", "generation.steer", "generation.language", "seed")
REFERENCE = ("data.reference", "data.max_reference", "data.reference_max_length", "data.lenient")
INFLUENCE = tuple(f"influence.{k}" for k in (
    "utility", "judge.model", "judge.base_url", "estimator", "precision", "grad_precision", "lr",
    "eval_batch_size", "max_length", "compile", "ref_grad_dtype", "shadow", "linear_kernel", "pad_multiple"))

# Keys no stage's output depends on: labels, the number of rounds (the runner's loop), how an endpoint
# is reached, and where stages run (executors give the same records on one process or many).
NOT_FINGERPRINTED = ("name", "rounds", "generation.api_key_env", "generation.http_concurrency",
                     "generation.http_timeout", "generation.http_max_retries", "generation.threads",
                     "influence.judge.api_key_env",
                     "eval.judge.api_key_env",
                     "distributed")
