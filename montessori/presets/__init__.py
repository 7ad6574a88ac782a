"""The shipped presets (YAML files beside this module) and their tiny dry-run form.

`tiny_overrides(name)` turns any preset into a run that takes a minute on a CPU: its models become tiny
random models of the same architecture (models/load.py TINY_ARCHS) and its sizes become the `tiny`
preset's, while every other choice of the preset (DPO with LoRA, the pairing rule, the prompt style,
the influence estimator, the learning rates' ratios) stays. CI runs the GPU presets this way.
"""

from __future__ import annotations

import json
from importlib import resources

# A preset's model -> the tiny random model of its architecture (the same chat template kind).
TINY_MODELS = {
    "smollm2": "tiny-random:0",
    "qwen2.5-coder-1.5b": "tiny-random-qwen2:0",
    "gemma3-270m": "tiny-random-gemma3:1",
}
# The `tiny` preset's keys that a dry run takes over: sizes, lengths, the CPU, and the loosened filters
# that let a random model's text through. Not learning rates, rules or estimators: those stay the preset's.
TINY_KEYS = (
    "models.device", "models.dtype", "data.max_reference", "data.reference_max_length",
    "generation.backend", "generation.batch_size", "generation.num_prompts", "generation.instructions.max_new_tokens",
    "generation.responses.max_new_tokens", "generation.min_chars", "generation.banned_words",
    "generation.prompt_style",  # a random model follows no format; the list style keeps its text
    "split.warmup", "split.probing", "warmup.max_length", "influence.eval_batch_size", "influence.max_length",
    "dpo.max_length", "mechanism.num_prompts", "mechanism.bootstrap_samples", "sft.num_pairs",
    "sft.global_batch_size", "sft.micro_batch_size", "sft.max_length", "eval.max_examples", "eval.max_length",
)


def tiny_overrides(name: str) -> list[str]:
    """Overrides (key=value) that run preset `name` on tiny random models at the `tiny` preset's sizes."""
    import yaml  # the package's own files: trusted YAML

    from montessori.config import preset_text
    preset = yaml.safe_load(preset_text(name)) or {}
    tiny = yaml.safe_load(resources.files(__name__).joinpath("tiny.yaml").read_text())
    out = []
    for role in ("teacher", "student"):
        spec = preset.get("models", {}).get(role, "smollm2")
        out.append(f"models.{role}={TINY_MODELS.get(spec, tiny['models'][role])}")
    for key in TINY_KEYS:
        node = tiny
        for part in key.split("."):
            node = node[part]
        out.append(f"{key}={json.dumps(node)}")  # JSON is YAML: lists and strings parse back as they were
    return out
