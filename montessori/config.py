"""The run configuration: one YAML file, one typed schema, torchtune-style overrides.

Every number of METHOD.md is a key here, with the paper's value as the default. Unknown keys and
wrong types are errors that name the key (pydantic ``extra="forbid"``).
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from montessori.errors import InputError

PRESETS = ("tiny", "smollm2-demo", "tinyllama-1b", "llama3-8b", "paper-shape")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Keys added after runs already existed, whose default reproduces the earlier behaviour: left out of
    # a stage's fingerprint while at their default, so upgrading montessori does not make finished
    # stages look stale (and re-run hours of work). A non-default value is fingerprinted as usual.
    LATER_KEYS: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_dump(self) -> dict:
        dump = self.model_dump(mode="json")
        for key in self.LATER_KEYS:
            if getattr(self, key) == type(self).model_fields[key].default:
                dump.pop(key)
        return dump


class ModelsConfig(Section):
    # A model spec: local HF dir, Hub id, path to a .gguf file, `smollm2` (embedded) or `tiny-random`.
    teacher: str = "smollm2"
    student: str = "smollm2"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Weights dtype for training/inference. `auto` = bf16 on CUDA, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class DataConfig(Section):
    # `builtin` = the seed/reference sets shipped in the package, else a path (jsonl/json/parquet/HF dir).
    seeds: str = "builtin"
    reference: str = "builtin"
    max_seeds: int | None = None
    max_reference: int | None = None
    reference_max_length: int = 1024
    lenient: bool = False


class SamplingConfig(Section):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    presence_penalty: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 1024


class GenerationConfig(Section):
    backend: Literal["auto", "transformers", "vllm", "http"] = "auto"
    # OpenAI-compatible endpoint for backend=http; the API key is read from `api_key_env`, never stored.
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    http_concurrency: int = 8
    http_timeout: float = 120.0
    http_max_retries: int = 5
    # Sequences (prompt x sample) per generate call; the n samples of a prompt share its encoding.
    # 16 from bench/generate.py on CPU (docs/benchmarks.md); GPU presets use more.
    batch_size: int = 16
    prompt_style: Literal["tagged", "list"] = "tagged"
    num_prompts: int = 64  # generation prompts per probing round (each sampled `instructions.n` times)
    examples_per_prompt: int = 8
    synthetic_per_prompt: int = 2  # once >= 2 synthetic instructions exist: 6 seeds + 2 synthetic
    instructions: SamplingConfig = SamplingConfig(n=4, temperature=1.0)
    responses: SamplingConfig = SamplingConfig(n=1, temperature=0.6)
    min_chars: int = 6
    max_chars: int = 400
    banned_words: list[str] = ["image", "images", "graph", "graphs", "picture", "pictures", "file",
                               "files", "map", "maps", "draw", "plot", "go to"]
    rouge_threshold: float = 0.7
    # Stage `data`: give up after this many prompts per wanted pair (sft.num_pairs) if too few are kept.
    data_max_prompts_per_pair: float = 3.0
    seed: int = 0


class SplitConfig(Section):
    warmup: int = 1000  # W: the first W generated pairs
    probing: int = 1000  # P: the next P pairs


class WarmupConfig(Section):
    epochs: int = 1
    lr: float = 5e-6
    batch_size: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_length: int = 1024
    seed: int = 0
    # Arithmetic over fp32 master weights: auto = bf16 autocast on CUDA (METHOD.md), fp32 on CPU.
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    gradient_checkpointing: bool = False


class InfluenceConfig(Section):
    LATER_KEYS = frozenset({"utility", "judge", "judge_url", "judge_model", "linear_kernel", "pad_multiple"})
    # What ranks the probing candidates (the paper's data-utility ablation): influence = local data
    # influence (this section's estimator); loss = the warmed-up student's own loss on the candidate
    # (larger = less known); judge = a judge's 1-10 grade of the pair. loss needs `pairs.rule: rank`.
    utility: Literal["influence", "loss", "judge"] = "influence"
    # Judge for utility=judge: a local model spec (None = this round's teacher) or an OpenAI-compatible
    # endpoint + model name (API key from $OPENAI_API_KEY).
    judge: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    # linear: first-order form, one fwd/bwd per candidate; exact: step + full reference pass (the check).
    # Measured agreement and speed: docs/benchmarks.md.
    estimator: Literal["exact", "linear"] = "linear"
    # Arithmetic of the reference evaluation (exact: before/after losses; linear: ∇L_ref), over fp32
    # master weights: fp32, tf32 (CUDA only, a no-op on CPU) or bf16 autocast. One AdamW step moves
    # weights ~1e-4 relative, below bf16/tf32 resolution: keep fp32 for exact.
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    # Arithmetic of the candidate's forward/backward (an ordinary training gradient). auto = bf16 for
    # the linear estimator on CUDA, fp32 otherwise.
    grad_precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    lr: float | None = None  # probing-step lr; None = the warm-up optimizer's next lr (optimizer.json)
    eval_batch_size: int = 8
    max_length: int = 1024
    # torch.compile (inductor, dynamic shapes). auto: only the graphed linear step on CUDA, whose copy
    # of the student is compiled decoder layer by decoder layer (25 -> 17 ms per TinyLlama-1.1B candidate
    # on an H200, ~7 s more setup; docs/benchmarks.md); true: also the student's forward and the eager
    # step's update passes, and the flat step; false: nothing.
    compile: Literal["auto"] | bool = "auto"
    # Memory layout (values are the same, bit for bit for `shadow`): auto keeps a fourth fp32 copy of
    # the weights on the device only when it fits (not for an 8B student on one 141 GB GPU): else
    # ∇L_ref is stored in bf16 and exact steps θ in place, restoring it from a pinned host copy.
    ref_grad_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    shadow: Literal["auto", "device", "host"] = "auto"
    # How the linear step runs (same values up to float rounding): hooks = eager, the gradient consumed
    # in buckets during backward; flat = a fused update per parameter as backward completes it; graphed = flat +
    # the candidate padded to a multiple of pad_multiple tokens and replayed as a CUDA graph per length.
    # auto = graphed on CUDA (17 vs 119 ms per TinyLlama-1.1B candidate on an H200 with compile=auto,
    # reproducible bit for bit), hooks elsewhere (the CPU step is matmul-bound: no gain). docs/benchmarks.md.
    linear_kernel: Literal["auto", "hooks", "flat", "graphed"] = "auto"
    pad_multiple: PositiveInt = 64


class PairsConfig(Section):
    # sign: chosen I>0 x rejected I<0 (METHOD.md); rank: above vs below the prompt's median.
    rule: Literal["sign", "rank"] = "sign"
    best_vs_worst: bool = False
    min_gap: float = 0.0
    max_per_prompt: int | None = None


class DPOConfig(Section):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    lr: float = 1e-6
    min_lr: float = 1e-9
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    stable_ratio: float = 0.5
    decay_ratio: float = 0.4
    max_length: int = 1024
    eval_fraction: float = 0.0
    lora: bool = False  # LoRA adapters through PEFT (large teachers); merged into the weights on save
    lora_r: int = 16
    lora_alpha: int = 32
    gradient_checkpointing: bool = False
    seed: int = 0


class MechanismConfig(Section):
    # Stage `mechanism` (after dpo): the updated and the original teacher write fresh candidates for the
    # same prompts, scored on this round's warm-up state (montessori/influence/mechanism.py).
    enabled: bool = False
    num_prompts: int = 64  # each sampled generation.instructions.n times, by each teacher
    bootstrap_samples: int = 1000


class SFTConfig(Section):
    num_pairs: int = 10000  # N training pairs written by the updated teacher (stage `data`)
    epochs: int = 1
    lr: float = 5e-6
    min_lr: float = 5e-9
    global_batch_size: int = 32
    micro_batch_size: int = 4
    warmup_ratio: float = 0.1
    stable_ratio: float = 0.5
    decay_ratio: float = 0.4
    max_length: int = 1024
    gradient_checkpointing: bool = False
    seed: int = 0


class EvalConfig(Section):
    prompts: str = "builtin"  # instruction/response set with trusted answers for the loss metric
    max_examples: int | None = None
    batch_size: int = 8
    max_length: int = 1024
    bootstrap_samples: int = 1000  # resamples of the prompts for every 95% interval
    # Answers for judged metrics: generated once per student and prompt set, cached.
    temperature: float = 0.0  # 0 = greedy; 0.7 = the usual sampled setting
    max_new_tokens: int = 512
    # Judge for the win rate / grading: a local model spec, or an OpenAI-compatible endpoint + model
    # name (API key read from `judge_api_key_env`). None = loss only.
    judge: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    questions: str | None = None  # MT-Bench-style question file for 1-10 grading
    tasks: list[str] = []  # lm-evaluation-harness tasks (extra [eval]), e.g. [mmlu, arc_challenge]
    task_path: str | None = None  # folder of extra harness task YAMLs (local data)


class DistributedConfig(Section):
    # Influence and generation on Ray (extra `[ray]`): one actor per GPU, or per group of
    # `gpus_per_worker` GPUs holding one model; candidates/prompts are fed to whichever actor is free.
    ray: bool = False
    address: str | None = None  # None = a local ray.init(); "auto" or "ray://head:10001" = a cluster
    num_workers: int | None = None  # None = cluster GPUs // gpus_per_worker (CPUs // cpus_per_worker without GPUs)
    gpus_per_worker: int = 1
    cpus_per_worker: int = 1
    # Prompts per generation task: fixed, so what is sampled does not depend on the number of workers.
    # A stage's call is split into such chunks; raise generation.batch_size to keep every worker busy.
    generation_chunk: int = 8
    # Training stages (warmup, dpo, sft) on several GPUs: `montessori run` starts them through a launcher.
    launcher: Literal["none", "accelerate", "torchrun"] = "none"
    num_processes: int | None = None  # None = every visible GPU
    fsdp: Literal["auto"] | bool = "auto"  # auto = FSDP for models of >= 3B parameters, else DDP


class Config(Section):
    name: str = "montessori"
    method: Literal["montessori", "self-instruct"] = "montessori"
    rounds: int = 1
    seed: int = 0
    models: ModelsConfig = ModelsConfig()
    data: DataConfig = DataConfig()
    generation: GenerationConfig = GenerationConfig()
    split: SplitConfig = SplitConfig()
    warmup: WarmupConfig = WarmupConfig()
    influence: InfluenceConfig = InfluenceConfig()
    pairs: PairsConfig = PairsConfig()
    dpo: DPOConfig = DPOConfig()
    mechanism: MechanismConfig = MechanismConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    distributed: DistributedConfig = DistributedConfig()

    def section_hash(self, *sections: str) -> str:
        """Hash of the named top-level sections: a stage re-runs only when what it reads changed."""
        payload = {s: _dump(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _dump(value: Any) -> Any:
    if isinstance(value, Section):
        return value.fingerprint_dump()
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _parse_scalar(text: str) -> Any:
    # YAML rules for override values: `4` -> int, `1e-6` -> float, `true` -> bool, `[a, b]` -> list.
    value = yaml.safe_load(text)
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)
    return value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected key=value, e.g. generation.num_prompts=4")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {key}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return raw


_UNION_TAG = re.compile(r"^(bool|int|float|str|none|literal\[.*\]|function-.*)$")


def _format_validation_error(source: str, err: ValidationError) -> str:
    def key_of(e) -> str:  # a union's member tags (e.g. "literal['auto']", "bool") are not keys
        return ".".join(str(p) for p in e["loc"] if not _UNION_TAG.match(str(p)))
    first = err.errors()[0]
    key = key_of(first)
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    msgs = list(dict.fromkeys(e["msg"] for e in err.errors() if key_of(e) == key))  # every union member's
    return f"{source}: key '{key}': {' or '.join(msgs)} (got {first.get('input')!r})"


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise InputError(_format_validation_error(source, err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}:{where} not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, str(path))


def preset_text(name: str) -> str:
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return resources.files("montessori.presets").joinpath(f"{name}.yaml").read_text()


def load_preset(name: str, overrides: list[str] | None = None) -> Config:
    raw = yaml.safe_load(preset_text(name)) or {}
    return config_from_dict(apply_overrides(raw, overrides or []), f"preset {name}")
