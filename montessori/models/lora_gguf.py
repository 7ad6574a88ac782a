"""A DPO-trained teacher for llama.cpp: its LoRA adapter as a GGUF adapter file over the base GGUF.

The `dpo` stage trains LoRA adapters on a teacher it loaded from a GGUF file (dequantized to torch) and
saves the merged model (model/), which only transformers can run: 2.2 tokens/s for the 1.5B Qwen
teacher on the 2-core machine, where the quantized base through llama.cpp wrote 16.9 (docs/experiments.md,
the own-tasks run: the `dataset` stage took 51 of its 103 minutes). llama.cpp applies a LoRA adapter to
a quantized model at run time (`llama_adapter_lora_init`), so the trained teacher runs at the base's
speed: the stage also writes model/adapter-N.gguf and model/adapter.json (which base they adapt;
`save_adapter`), and the llamacpp backend loads them over the base (backends/llamacpp.gguf_source).

The file is what llama.cpp's convert_lora_to_gguf.py writes (general.type=adapter, adapter.type=lora,
adapter.lora.alpha; tensors `<base tensor>.lora_a` of shape (r, in) and `.lora_b` (out, r)), written here
with the `gguf` package because that script ships in llama.cpp's sources, not in any wheel, and needs the
base model's HF config, which a GGUF teacher does not have. Names map through gguf's own
TensorNameMap; LLaMA-family q/k rows are permuted as the converter permutes the base weights (llama.cpp's
rotary layout), which for a LoRA pair is a permutation of B's rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

ADAPTER_JSON = "adapter.json"
# Architectures whose converter permutes attn_q/attn_k (convert_hf_to_gguf.py LlamaModel.modify_tensors).
PERMUTED = {"llama"}


def _field(reader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value[0]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute, on the output rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_lora_gguf(adapter_dir: str | Path, base_gguf: str | Path, out: str | Path) -> Path:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) -> llama.cpp LoRA GGUF at `out`."""
    import gguf
    from safetensors.numpy import load_file
    adapter_dir, out = Path(adapter_dir), Path(out)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    reader = gguf.GGUFReader(str(base_gguf))
    arch = _field(reader, "general.architecture")
    n_blocks = int(_field(reader, f"{arch}.block_count"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv"))
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, n_blocks)
    base_tensors = {t.name for t in reader.tensors}

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        module, _, part = key.rpartition(".lora_")  # base_model.model.<module>.lora_A.weight
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"{adapter_dir}: unexpected tensor {key} (only LoRA A/B pairs are converted)")
        module = module.removeprefix("base_model.model.")
        pairs.setdefault(module, {})[part[0]] = value.astype(np.float32)

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for module in sorted(pairs):
        a, b = pairs[module]["A"], pairs[module]["B"]
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or name not in base_tensors:
            raise ValueError(f"{adapter_dir}: module {module} has no tensor in {base_gguf} ({name})")
        if arch in PERMUTED and name.endswith(("attn_q.weight", "attn_k.weight")):
            b = _permute(b, n_head if "attn_q" in name else n_head_kv)
        stem = name.removesuffix(".weight")
        writer.add_tensor(f"{stem}.weight.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{stem}.weight.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def save_adapter(adapter_dir: str | Path, teacher: str, model_dir: str | Path) -> list[Path]:
    """Beside a trained teacher's merged weights (model_dir): its new adapter as GGUF, after the adapters
    of `teacher` (the teacher it was trained from, when that one was itself saved so: LoRA deltas add
    up, so base + every round's adapter is the merged model), and adapter.json naming the base and the
    files in order. Returns the files."""
    from montessori.models.load import NAMED_MODELS, assemble_gguf
    model_dir = Path(model_dir)
    earlier = adapted_base(teacher)
    base, before = (earlier[0], earlier[1]) if earlier else (teacher, [])
    names = []
    for i, path in enumerate(before, 1):
        names.append(f"adapter-{i}.gguf")
        shutil.copyfile(path, model_dir / names[-1])
    names.append(f"adapter-{len(before) + 1}.gguf")
    base_file = assemble_gguf(NAMED_MODELS[base]) if base in NAMED_MODELS else Path(base).expanduser()
    write_lora_gguf(adapter_dir, base_file, model_dir / names[-1])
    (model_dir / ADAPTER_JSON).write_text(json.dumps({"base": base, "adapters": names}) + "\n")
    return [model_dir / n for n in names]


def adapted_base(spec: str) -> tuple[str, list[Path]] | None:
    """(base GGUF spec, adapter GGUF files in order) when `spec` is a trained teacher saved with
    save_adapter, else None."""
    folder = Path(spec).expanduser()
    meta = folder / ADAPTER_JSON
    if not folder.is_dir() or not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    return data["base"], [folder / name for name in data["adapters"]]
