"""A DPO-trained GGUF teacher runs on llama.cpp: its LoRA adapters written as a GGUF adapter over the
base file move llama.cpp's logits as the merged weights move transformers' (issue 27: the trained
teacher wrote the own-tasks run's training set at 2.2 tokens/s through transformers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import montessori.generation.backends.llamacpp  # noqa: F401 (sets OMP_WAIT_POLICY before llama_cpp loads)

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'montessori[cpu]')")

from montessori.config import load_preset  # noqa: E402
from montessori.context import StageContext  # noqa: E402
from montessori.generation.backends import choose_backend  # noqa: E402
from montessori.generation.backends.base import Request, Sampling  # noqa: E402
from montessori.generation.backends.llamacpp import LlamaCppBackend, adapters, gguf_source  # noqa: E402
from montessori.models import lora_gguf  # noqa: E402
from montessori.models.load import load_model  # noqa: E402
from montessori.store import RunStore, write_jsonl  # noqa: E402
from montessori.training.dpo import run_dpo  # noqa: E402
from tests.test_dpo import make_prefs  # noqa: E402

PROMPT = "Write one short instruction for a lathe operator."


def llamacpp_logits(gguf, ids: list[int], lora=None) -> np.ndarray:
    model = llama_cpp.Llama(model_path=str(gguf), logits_all=True, verbose=False, n_ctx=256, n_threads=2,
                            **({"lora_path": str(lora)} if lora else {}))
    model.eval(ids)
    return np.array(model.scores[:len(ids)])


@pytest.fixture(scope="module")
def smollm2():
    try:
        gguf, _ = gguf_source("smollm2")
    except Exception as err:  # the embedded model's package is missing
        pytest.skip(f"SmolLM2 GGUF not available: {err}")
    model, tokenizer = load_model("smollm2", device="cpu", dtype="float32")
    return gguf, model, tokenizer


def random_adapter(model, folder, scale: float, modules: list[str]):
    """A PEFT LoRA with random A and B (B is zero at init: nothing would move), saved to `folder`."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=0.0,
                                                  task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * scale
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.mark.parametrize("permuted", [True, False])
def test_the_adapter_moves_llamacpp_as_the_merged_weights_move_transformers(smollm2, tmp_path, monkeypatch, permuted):
    """q/k adapters on a LLaMA model: the change of llama.cpp's logits (adapter on vs off) follows the
    change of transformers' (LoRA on vs off) only with the converter's rotary row permutation; without it
    (permuted=False, the control) they are unrelated. llama.cpp multiplies with 8-bit activations, so a
    change must stand well above that noise: the adapter is large on purpose."""
    gguf, model, tokenizer = smollm2
    peft_model = random_adapter(model, tmp_path / "adapter", 0.1, ["q_proj", "k_proj"])
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(ids).logits[0].numpy()
        adapted = peft_model(ids).logits[0].numpy()
    peft_model.unload()
    if not permuted:
        monkeypatch.setattr(lora_gguf, "PERMUTED", set())
    out = lora_gguf.write_lora_gguf(tmp_path / "adapter", gguf, tmp_path / "adapter.gguf")
    moved_hf = adapted - base
    moved_cpp = llamacpp_logits(gguf, ids[0].tolist(), out) - llamacpp_logits(gguf, ids[0].tolist())
    corr = np.corrcoef(moved_hf.ravel(), moved_cpp.ravel())[0, 1]
    if permuted:
        assert corr > 0.95
        assert 0.85 < np.linalg.norm(moved_cpp) / np.linalg.norm(moved_hf) < 1.15
    else:
        assert corr < 0.5


def test_dpo_of_a_gguf_teacher_saves_adapters_llamacpp_runs_and_round_two_stacks_them(smollm2, tmp_path):
    config = load_preset("tiny", ["models.teacher=smollm2", "dpo.lora=true", "dpo.lora_r=4", "dpo.lr=1e-3",
                                  "dpo.eval_fraction=0", "dpo.max_length=128"])
    store = RunStore(tmp_path)
    for round_ in (1, 2):
        write_jsonl(store.stage(round_, "preferences").file("preferences.jsonl"), make_prefs(2))
        run_dpo(StageContext(config, store, round_, store.stage(round_, "dpo"), active=("preferences", "dpo"),
                             progress=False))
    first, second = (store.stage(r, "dpo").path / "model" for r in (1, 2))
    assert json.loads((first / "adapter.json").read_text()) == {"base": "smollm2", "adapters": ["adapter-1.gguf"]}
    assert json.loads((second / "adapter.json").read_text()) == {"base": "smollm2",
                                                                  "adapters": ["adapter-1.gguf", "adapter-2.gguf"]}
    # Round 2 carries round 1's adapter (the model it trained from), and adds its own.
    assert (second / "adapter-1.gguf").read_bytes() == (first / "adapter-1.gguf").read_bytes()
    assert adapters(str(second)) == [second / "adapter-1.gguf", second / "adapter-2.gguf"]
    assert gguf_source(str(second))[0] == smollm2[0]  # the base file, as it is
    gen = config.generation.model_copy(update={"backend": "auto", "base_url": None})
    assert choose_backend(gen, str(second), config.models.model_copy(update={"device": "cpu"})) == "llamacpp"
    backend = LlamaCppBackend.load(str(second), threads=2, parallel=2)
    try:
        assert len(backend.lora) == 2
        out = backend.generate([Request([{"role": "user", "content": PROMPT}], seed=1)],
                               Sampling(n=1, temperature=0.0, max_new_tokens=8))
        assert out[0][0].tokens > 0
    finally:
        backend.close()


def test_a_teacher_not_read_from_gguf_gets_no_adapter_files(tmp_path):
    config = load_preset("tiny", ["dpo.lora=true", "dpo.lora_r=4", "dpo.eval_fraction=0"])
    store = RunStore(tmp_path)
    write_jsonl(store.stage(1, "preferences").file("preferences.jsonl"), make_prefs(2))
    run_dpo(StageContext(config, store, 1, store.stage(1, "dpo"), active=("preferences", "dpo"), progress=False))
    model = store.stage(1, "dpo").path / "model"
    assert (model / "model.safetensors").exists() and not (model / "adapter.json").exists()
    assert adapters(str(model)) == []
