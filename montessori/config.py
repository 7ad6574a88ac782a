"""The run configuration: one YAML file, one typed schema, torchtune-style overrides.

Every number of the method is a key here, with the paper's value as the default unless docs/method.md
says why not. Unknown keys and wrong types are errors that name the key (pydantic ``extra="forbid"``).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt, ValidationError, field_validator, model_validator)

from montessori import safe_yaml
from montessori.errors import InputError

PRESETS = ("tiny", "smollm2-demo", "tinyllama-1b", "llama3-8b", "paper-shape", "qwen-gemma", "own-tasks")

# Every size, rate and probability is bounded here, so a bad value is refused (exit 2, naming the key)
# before any stage runs or any old output is touched.
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

# Dtypes and precisions have the torch names (float32, bfloat16, float16; tf32 = float32 on TF32 tensor cores).
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Precision = Literal["float32", "tf32", "bfloat16"]
AutoPrecision = Literal["auto", "float32", "tf32", "bfloat16"]
StoredDtype = Literal["auto", "float32", "bfloat16"]


def _on_off(value: Any) -> Any:
    """YAML reads an unquoted on/off (and true/false) as a boolean: `compile: on` means "on"."""
    return ("on" if value else "off") if isinstance(value, bool) else value


OnOff = BeforeValidator(_on_off)


class Section(BaseModel):
    # allow_inf_nan=False: every float key is finite (sft.lr=.inf once trained a student into NaNs).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
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
    # Weights dtype for training/inference. `auto` = bfloat16 on CUDA, float32 on CPU.
    dtype: Dtype = "auto"


class DataConfig(Section):
    # `builtin` = the seed/reference sets shipped in the package, else a path (jsonl/json/parquet/HF dir).
    seeds: str = "builtin"
    reference: str = "builtin"
    max_seeds: PositiveInt | None = None
    max_reference: PositiveInt | None = None
    reference_max_length: PositiveInt = 1024
    lenient: bool = False
    # Longest text field of a seed task, in characters: seeds go verbatim into the teacher's prompts, so
    # a longer one is refused (skipped with `lenient`) rather than becoming a prompt of millions of
    # tokens. Reference and evaluation records are cut to data.reference_max_length / eval.max_length tokens.
    max_seed_chars: PositiveInt = 20000


class SamplingConfig(Section):
    n: PositiveInt = 1
    temperature: NonNegativeFloat = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    presence_penalty: float = 1.0
    repetition_penalty: PositiveFloat = 1.0
    max_new_tokens: PositiveInt = 1024


class SteerConfig(Section):
    # Bias each generation prompt's seed examples toward the kinds that measured best (montessori.generation.steer):
    # a seed's weight is exp(strength * z), z = the standardized mean influence of its kind (task type
    # or the seed itself) in `source` (a finished run) or, when None, in this run's earlier rounds
    # (the `dataset` stage also sees its own round's). Off: the prompts are the unsteered ones, byte for byte.
    enabled: bool = False
    source: str | None = None
    by: Literal["task_type", "seed"] = "task_type"
    strength: float = 1.0
    min_count: PositiveInt = 3  # kinds measured fewer times keep weight 1


class GenerationConfig(Section):
    LATER_KEYS = frozenset({"steer", "engine", "compile", "language", "threads"})
    # auto: http with a base_url, else vLLM on a GPU, else llama.cpp for a GGUF teacher on the CPU when
    # llama-cpp-python is installed (`montessori[cpu]`), else transformers. llamacpp runs GGUF teachers
    # only; a teacher in HF form (the DPO-updated one) runs on transformers.
    backend: Literal["auto", "transformers", "vllm", "http", "llamacpp"] = "auto"
    # llamacpp: CPU threads; None = every core this process may use. Not fingerprinted (how it runs).
    threads: PositiveInt | None = None
    # transformers backend: fast = own continuous-batching decode loop (backends/slots.py), generate =
    # `model.generate`; auto = fast on CUDA, generate on CPU. compile: the fast engine's decode step
    # through torch.compile + CUDA graphs (on), as captured CUDA graphs of the eager step (graphs: no
    # compile time), or eager (off); auto = graphs with CUDA, off without. Why: docs/benchmarks.md, Defaults.
    engine: Literal["auto", "fast", "generate"] = "auto"
    compile: Annotated[Literal["auto", "on", "graphs", "off"], OnOff] = "auto"
    # OpenAI-compatible endpoint for backend=http; the API key is read from the environment variable
    # named by `api_key_env` (every HTTP client: generation.api_key_env, influence/eval.judge.api_key_env).
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    http_concurrency: PositiveInt = 8
    http_timeout: PositiveFloat = 120.0
    http_max_retries: NonNegativeInt = 5
    # Sequences (prompt x sample) per generate call; the n samples of a prompt share its encoding. The
    # default is the CPU's (docs/benchmarks.md, Defaults); GPU presets use more.
    batch_size: PositiveInt = 16
    prompt_style: Literal["tagged", "list"] = "tagged"
    # The language the teacher is asked to write instructions and answers in: `auto` detects it from the
    # seed tasks (generation/prompts.detect_language; English, the prompts' own language, asks nothing
    # more), else a name ("Japanese") or a code ("ja") the prompts spell out.
    language: Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[^\W\d_][\w ()'-]*$")] = "auto"
    num_prompts: PositiveInt = 64  # generation prompts per probing round (each sampled `instructions.n` times)
    examples_per_prompt: PositiveInt = 8
    synthetic_per_prompt: NonNegativeInt = 2  # once >= 2 synthetic instructions exist: 6 seeds + 2 synthetic
    instructions: SamplingConfig = SamplingConfig(n=4, temperature=1.0)
    # n > 1: that many sampled answers per instruction in the responses stage, each its own pair, and an
    # instruction's influence is the mean of its answers' (stage preferences): one answer's influence
    # predicts another's poorly (docs/experiments.md, test-retest), and DPO sees only the instruction.
    # split.* still counts pairs. The dataset stage writes one answer per instruction.
    responses: SamplingConfig = SamplingConfig(n=1, temperature=0.6)
    min_chars: NonNegativeInt = 6
    max_chars: PositiveInt = 400
    banned_words: list[str] = ["image", "images", "graph", "graphs", "picture", "pictures", "file",
                               "files", "map", "maps", "draw", "plot", "go to"]
    rouge_threshold: Fraction = 0.7
    # Stage `dataset`: give up after this many prompts per wanted pair (sft.num_pairs) if too few are kept.
    dataset_max_prompts_per_pair: PositiveFloat = 3.0
    steer: SteerConfig = SteerConfig()


class SplitConfig(Section):
    warmup: PositiveInt = 1000  # W: the first W generated pairs
    probing: PositiveInt = 1000  # P: the next P pairs


class WarmupConfig(Section):
    # One pass over the W warm-up pairs (docs/method.md, step 4); there is no `epochs` key.
    lr: PositiveFloat = 5e-6
    # Examples per optimizer step (global) and per forward pass (micro); accumulation = global / micro.
    global_batch_size: PositiveInt = 1
    micro_batch_size: PositiveInt = 1
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    max_length: PositiveInt = 1024
    seed: int = 0  # the warm-up's data order (not the top-level seed, which seeds what samples)
    # Arithmetic over fp32 master weights: auto = bfloat16 autocast on CUDA (docs/method.md, step 4), float32 on CPU.
    precision: AutoPrecision = "auto"
    gradient_checkpointing: bool = False


class JudgeConfig(Section):
    # A judge (influence.judge, eval.judge): `model` is a local model spec (HF dir, *.gguf, Hub id,
    # smollm2), or with `base_url` the model name that OpenAI-compatible endpoint serves (as
    # models.teacher with generation.base_url); its API key is read from the variable `api_key_env`
    # names. Added after runs existed: at their defaults model and base_url are left out of fingerprints.
    LATER_KEYS = frozenset({"model", "base_url"})
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"

    @model_validator(mode="after")
    def _endpoint_names_its_model(self) -> JudgeConfig:
        if self.base_url and not self.model:
            raise ValueError(f"base_url {self.base_url} needs model (the model name the endpoint serves)")
        return self


class InfluenceConfig(Section):
    LATER_KEYS = frozenset({"utility", "judge", "linear_kernel", "pad_multiple"})
    # What ranks the probing candidates (the paper's data-utility ablation): influence = local data
    # influence (this section's estimator); loss = the warmed-up student's own loss on the candidate
    # (larger = less known); judge = a judge's 1-10 grade of the pair. loss needs `preferences.rule: rank`.
    utility: Literal["influence", "loss", "judge"] = "influence"
    # The judge of utility=judge (JudgeConfig); no model = this round's teacher.
    judge: JudgeConfig = JudgeConfig()
    # linear: first-order form, one fwd/bwd per candidate; exact: step + full reference pass (the check).
    # Measured agreement and speed: docs/benchmarks.md.
    estimator: Literal["exact", "linear"] = "linear"
    # Arithmetic of the reference evaluation (exact: before/after losses; linear: ∇L_ref), over fp32
    # master weights: float32, tf32 (CUDA only, a no-op on CPU) or bfloat16 autocast. One AdamW step
    # moves weights ~1e-4 relative, below bf16/tf32 resolution: keep float32 for exact.
    precision: Precision = "float32"
    # Arithmetic of the candidate's forward/backward (an ordinary training gradient). auto = bfloat16 for
    # the linear estimator on CUDA, float32 otherwise.
    grad_precision: AutoPrecision = "auto"
    lr: PositiveFloat | None = None  # probing-step lr; None = the warm-up optimizer's next lr (optimizer.json)
    eval_batch_size: PositiveInt = 8
    max_length: PositiveInt = 1024
    # torch.compile (inductor, dynamic shapes). auto: only the graphed linear step on CUDA, whose copy
    # of the student is compiled decoder layer by decoder layer; on: also the student's forward and the
    # eager step's update passes, and the flat step; off: nothing. Measured: docs/benchmarks.md, Defaults.
    compile: Annotated[Literal["auto", "on", "off"], OnOff] = "auto"
    # Memory layout (values are the same, bit for bit for `shadow`): auto keeps a fourth fp32 copy of
    # the weights on the device only when it fits (not for an 8B student on one 141 GB GPU): else
    # ∇L_ref is stored in bf16 and exact steps θ in place, restoring it from a pinned host copy.
    ref_grad_dtype: StoredDtype = "auto"
    shadow: Literal["auto", "device", "host"] = "auto"
    # How the linear step runs (the same quantity, computed differently): hooks = eager, the gradient
    # consumed in buckets during backward; flat = a fused update per parameter as backward completes it;
    # graphed = flat + the candidate padded to a multiple of pad_multiple tokens, a CUDA graph per length.
    # auto = graphed on CUDA (reproducible bit for bit), hooks elsewhere (the CPU step is matmul-bound).
    # Their agreement and speed: docs/benchmarks.md, Defaults.
    linear_kernel: Literal["auto", "hooks", "flat", "graphed"] = "auto"
    pad_multiple: PositiveInt = 64


class PreferencesConfig(Section):
    LATER_KEYS = frozenset({"control_length"})
    # sign: chosen I>0 x rejected I<0 (the paper's, docs/method.md step 6); rank: above vs below the prompt's median.
    rule: Literal["sign", "rank"] = "sign"
    # Rank by the influence less its least-squares line in log response length (over the round's scored
    # candidates) instead of the raw influence. The influence rewards long answers (docs/experiments.md,
    # length control), which the instruction DPO trains on only partly decides; this leaves what the
    # length does not explain. The pairs keep the raw values.
    control_length: bool = False
    best_vs_worst: bool = False
    min_gap: NonNegativeFloat = 0.0
    max_per_prompt: PositiveInt | None = None


class Schedule(Section):
    """The schedule teacher DPO and student SFT share (docs/method.md, steps 7 and 9: 1 epoch, WSD 10/50/40
    down to min_lr). The keys stay flat in each section (dpo.lr, sft.lr): one definition, two uses."""
    lr: PositiveFloat
    min_lr: NonNegativeFloat
    epochs: PositiveInt = 1
    warmup_ratio: Fraction = 0.1
    stable_ratio: Fraction = 0.5
    decay_ratio: Fraction = 0.4
    max_length: PositiveInt = 1024
    gradient_checkpointing: bool = False
    seed: int = 0  # this training stage's data order, split and initialisation (not the top-level seed)


# TRL's DPO losses that need a key montessori does not have: exo_pair needs label smoothing > 0 (TRL
# refuses it at 0, the only value montessori passes).
DPO_LOSSES_NEEDING_UNSET_KEYS = {"exo_pair": "TRL's label_smoothing > 0, which montessori does not set"}


@functools.cache
def dpo_loss_types() -> tuple[str, ...]:
    """The DPO loss types the installed TRL declares (its DPOConfig.loss_type help), less those above:
    the one list, read from TRL's source because importing trl takes ~10 s, too long to read a config."""
    spec = importlib.util.find_spec("trl")
    help_text = None
    if spec is not None and spec.submodule_search_locations:
        source = Path(list(spec.submodule_search_locations)[0]) / "trainer" / "dpo_config.py"
        if source.is_file():
            for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
                if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "loss_type":
                    for kw in getattr(node.value, "keywords", []):
                        if kw.arg == "metadata":
                            help_text = ast.literal_eval(kw.value).get("help")
    if help_text is None:  # TRL moved its config: ask the class itself (slow, but right)
        import dataclasses

        from trl import DPOConfig as TRLDPOConfig
        help_text = next(f.metadata.get("help", "") for f in dataclasses.fields(TRLDPOConfig) if f.name == "loss_type")
    names = dict.fromkeys(re.findall(r"`'(\w+)'`", help_text))
    return tuple(n for n in names if n not in DPO_LOSSES_NEEDING_UNSET_KEYS)


class DPOConfig(Schedule):
    lr: PositiveFloat = 1e-6
    min_lr: NonNegativeFloat = 1e-9
    beta: PositiveFloat = 0.1
    loss_type: str = "sigmoid"  # one of dpo_loss_types(): what the installed TRL computes
    # Examples per optimizer step over all processes (global) and per forward pass of one process (micro),
    # as in sft: accumulation = global / (micro x processes).
    global_batch_size: PositiveInt = 2
    micro_batch_size: PositiveInt = 2
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    lora: bool = False  # LoRA adapters through PEFT (large teachers); merged into the weights on save
    lora_r: PositiveInt = 16
    lora_alpha: PositiveInt = 32

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value in DPO_LOSSES_NEEDING_UNSET_KEYS:
            raise ValueError(f"'{value}' needs {DPO_LOSSES_NEEDING_UNSET_KEYS[value]}")
        if value not in dpo_loss_types():
            raise ValueError(f"must be one of {', '.join(dpo_loss_types())} (the installed TRL's DPO losses)")
        return value


class MechanismConfig(Section):
    # Stage `mechanism` (after dpo): the updated and the original teacher write fresh candidates for the
    # same prompts, scored on this round's warm-up state (montessori/influence/mechanism.py).
    enabled: bool = False
    num_prompts: PositiveInt = 64  # each sampled generation.instructions.n times, by each teacher
    bootstrap_samples: PositiveInt = 1000


class SFTConfig(Schedule):
    num_pairs: PositiveInt = 10000  # N training pairs written by the updated teacher (stage `dataset`)
    lr: PositiveFloat = 5e-6
    min_lr: NonNegativeFloat = 5e-9
    global_batch_size: PositiveInt = 32
    micro_batch_size: PositiveInt = 4


class EvalConfig(Section):
    prompts: str = "builtin"  # instruction/response set with trusted answers for the loss metric
    max_examples: PositiveInt | None = None
    batch_size: PositiveInt = 8
    max_length: PositiveInt = 1024
    bootstrap_samples: PositiveInt = 1000  # resamples of the prompts for every 95% interval
    # Answers for judged metrics: generated once per student and prompt set, cached.
    temperature: NonNegativeFloat = 0.0  # 0 = greedy; 0.7 = the usual sampled setting
    max_new_tokens: PositiveInt = 512
    # The judge of the win rate / grading (JudgeConfig); no model = loss only.
    judge: JudgeConfig = JudgeConfig()
    questions: str | None = None  # MT-Bench-style question file for 1-10 grading
    tasks: list[str] = []  # lm-evaluation-harness tasks (extra [eval]), e.g. [mmlu, arc_challenge]
    task_path: str | None = None  # folder of extra harness task YAMLs (local data)
    # Verifiable instruction following: IFEval JSONL (key, prompt, instruction_id_list, kwargs), greedy
    # answers checked by program (montessori.evaluation.ifeval, extra [ifeval]). None = not measured.
    # Its answers get their own budget: lm-evaluation-harness's ifeval task allows 1280 new tokens, and
    # "at least 300 words" does not fit in eval.max_new_tokens' 512.
    LATER_KEYS = frozenset({"ifeval", "ifeval_max_prompts", "ifeval_max_new_tokens"})
    ifeval: str | None = None
    ifeval_max_prompts: PositiveInt | None = None  # the file's first N prompts
    ifeval_max_new_tokens: PositiveInt = 1280


class DistributedConfig(Section):
    # Influence and generation on Ray (extra `[ray]`): one actor per GPU, or per group of
    # `gpus_per_worker` GPUs holding one model; candidates/prompts are fed to whichever actor is free.
    ray: bool = False
    address: str | None = None  # None = a local ray.init(); "auto" or "ray://head:10001" = a cluster
    num_workers: PositiveInt | None = None  # None = cluster GPUs // gpus_per_worker (CPUs // cpus_per_worker without GPUs)
    gpus_per_worker: PositiveInt = 1
    cpus_per_worker: PositiveInt = 1
    # Prompts per generation task: fixed, so what is sampled does not depend on the number of workers.
    # A stage's call is split into such chunks; raise generation.batch_size to keep every worker busy.
    generation_chunk: PositiveInt = 8
    # Training stages (warmup, dpo, sft) on several GPUs: `montessori run` starts them through a launcher.
    launcher: Literal["none", "accelerate", "torchrun"] = "none"
    num_processes: PositiveInt | None = None  # None = every visible GPU
    fsdp: Literal["auto"] | bool = "auto"  # auto = FSDP for models of >= 3B parameters, else DDP


class Config(Section):
    name: str = "montessori"
    method: Literal["montessori", "self-instruct"] = "montessori"
    rounds: PositiveInt = 1
    seed: int = 0  # every stage that samples; the training stages' own `seed` keys are theirs alone
    models: ModelsConfig = ModelsConfig()
    data: DataConfig = DataConfig()
    generation: GenerationConfig = GenerationConfig()
    split: SplitConfig = SplitConfig()
    warmup: WarmupConfig = WarmupConfig()
    influence: InfluenceConfig = InfluenceConfig()
    preferences: PreferencesConfig = PreferencesConfig()
    dpo: DPOConfig = DPOConfig()
    mechanism: MechanismConfig = MechanismConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        # Rules between keys: checked with the schema, so a bad combination is refused before any stage
        # runs (they were found when dpo or sft started, after every stage before it). A message starts
        # with the keys, which _format_validation_error shows as they are.
        for name in ("dpo", "sft"):
            s = getattr(self, name)
            total = s.warmup_ratio + s.stable_ratio + s.decay_ratio
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"keys '{name}.warmup_ratio' + '{name}.stable_ratio' + '{name}.decay_ratio': the "
                                 f"schedule's shares must sum to 1 (got {s.warmup_ratio:g} + {s.stable_ratio:g} + "
                                 f"{s.decay_ratio:g} = {total:g})")
        for name in ("warmup", "dpo", "sft"):
            s = getattr(self, name)
            if s.global_batch_size % s.micro_batch_size:
                raise ValueError(f"key '{name}.global_batch_size': {s.global_batch_size} is not a multiple of "
                                 f"{name}.micro_batch_size={s.micro_batch_size}")
        return self

    def value(self, key: str) -> Any:
        """The value of a dotted key (`sft.lr`, `generation.instructions`), as stored in a fingerprint."""
        parent_key, _, leaf = key.rpartition(".")
        parent: Any = self
        for part in parent_key.split(".") if parent_key else ():
            parent = getattr(parent, part)
        if not hasattr(parent, leaf):
            raise KeyError(key)
        return _dump(getattr(parent, leaf))

    def keys_dump(self, keys: tuple[str, ...]) -> dict:
        """{key: value} for a stage's declared keys; a LATER_KEYS key at its default is left out."""
        out = {}
        for key in keys:
            parent_key, _, leaf = key.rpartition(".")
            parent = self
            for part in parent_key.split(".") if parent_key else ():
                parent = getattr(parent, part)
            if leaf in parent.LATER_KEYS and getattr(parent, leaf) == type(parent).model_fields[leaf].default:
                continue
            out[key] = self.value(key)
        return out

    def to_yaml(self) -> str:
        return safe_yaml.dump(self.model_dump(mode="json"))


def _dump(value: Any) -> Any:
    if isinstance(value, Section):
        return value.fingerprint_dump()
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _parse_scalar(text: str) -> Any:
    # YAML rules for override values: `4` -> int, `1e-6` -> float, `true` -> bool, `[a, b]` -> list.
    try:
        value = safe_yaml.load(text)
    except yaml.YAMLError as err:
        raise InputError(f"override value {text!r}: not valid YAML ({getattr(err, 'problem', err)})") from None
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
    if not key and first["type"] == "value_error":  # a rule between keys (Config._consistent): names them
        return f"{source}: {first['ctx']['error']}"
    msgs = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in err.errors() if key_of(e) == key))
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
    if not path.is_file():
        raise InputError(f"{path}: not a file (give the config file, e.g. RUN/config.yaml)")
    if path.stat().st_size > safe_yaml.MAX_BYTES:  # refused before it is read into memory
        raise InputError(f"{path}: {path.stat().st_size} bytes, over the limit of {safe_yaml.MAX_BYTES} for a config")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte {err.object[err.start]:#04x})") from None
    try:
        raw = safe_yaml.load(text) or {}
    except safe_yaml.UnsafeYAML as err:
        where = f" line {err.line}:" if err.line else ""
        raise InputError(f"{path}:{where} {err.problem}") from None
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
    raw = safe_yaml.load(preset_text(name)) or {}
    return config_from_dict(apply_overrides(raw, overrides or []), f"preset {name}")
