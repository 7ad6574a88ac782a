import pytest
import yaml

from montessori.cli import main
from montessori.config import PRESETS, Config, load_config, load_preset
from montessori.errors import InputError


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name):
    assert isinstance(load_preset(name), Config)


def test_defaults_are_the_papers_numbers():
    c = Config()
    assert (c.generation.instructions.n, c.generation.instructions.temperature, c.generation.instructions.top_p) == (4, 1.0, 0.9)
    assert (c.generation.responses.n, c.generation.responses.temperature) == (1, 0.6)
    assert c.generation.instructions.presence_penalty == 1.0 and c.generation.instructions.max_new_tokens == 1024
    assert c.generation.rouge_threshold == 0.7 and (c.generation.min_chars, c.generation.max_chars) == (6, 400)
    assert (c.warmup.lr, c.warmup.weight_decay) == (5e-6, 0.0)
    assert (c.dpo.beta, c.dpo.lr, c.dpo.min_lr) == (0.1, 1e-6, 1e-9)
    assert (c.dpo.global_batch_size, c.dpo.micro_batch_size) == (2, 2)  # batch 2, no accumulation
    assert (c.warmup.global_batch_size, c.warmup.micro_batch_size) == (1, 1)
    assert (c.dpo.warmup_ratio, c.dpo.stable_ratio, c.dpo.decay_ratio) == (0.1, 0.5, 0.4)
    assert (c.sft.lr, c.sft.min_lr, c.sft.global_batch_size, c.sft.num_pairs) == (5e-6, 5e-9, 32, 10000)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x"}))
    c = load_config(path, ["generation.num_prompts=4", "dpo.lr=1e-5", "generation.prompt_style=list",
                           "generation.instructions.n=2", "data.lenient=true"])
    assert c.generation.num_prompts == 4 and c.dpo.lr == 1e-5 and c.generation.prompt_style == "list"
    assert c.generation.instructions.n == 2 and c.data.lenient is True


@pytest.mark.parametrize("content, override, expected", [
    ({"generation": {"num_promts": 3}}, [], "unknown key 'generation.num_promts'"),
    ({"dpo": {"beta": "high"}}, [], "key 'dpo.beta'"),
    ({}, ["rounds=two"], "key 'rounds'"),
    ({}, ["nonsense"], "expected key=value"),
    ({}, ["influence.estimator=quadratic"], "key 'influence.estimator'"),
    ({}, ["influence.compile=maybe"], "key 'influence.compile': Input should be 'auto', 'on' or 'off'"),
    ({}, ["warmup.global_batch_size=3", "warmup.micro_batch_size=2"],
     "key 'warmup.global_batch_size': 3 is not a multiple of warmup.micro_batch_size=2"),
    ({}, ["eval.judge.base_url=http://127.0.0.1:8000/v1"], "key 'eval.judge': base_url .* needs model"),
])
def test_bad_config_names_the_key(tmp_path, content, override, expected):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(InputError, match=expected):
        load_config(path, override)


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("generation:\n  num_promts: 3\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "generation.num_promts" in err
    path.write_text("generation: [unclosed\n")
    assert main(["run", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_init_writes_preset_and_refuses_overwrite(tmp_path, capsys):
    assert main(["init", str(tmp_path / "d"), "--preset", "tiny"]) == 0
    assert load_config(tmp_path / "d" / "config.yaml").name == "tiny"
    assert main(["init", str(tmp_path / "d"), "--preset", "tiny"]) == 2
    assert main(["init", str(tmp_path / "d"), "--preset", "tiny", "--force"]) == 0


def test_keys_added_later_do_not_invalidate_finished_stages_at_their_default():
    """influence.utility and its judge keys, linear_kernel and pad_multiple came after runs existed: at
    their defaults they are left out of what a stage fingerprints (`keys_dump`, the dump of a stage's
    declared keys); set, they count."""
    from montessori.config import load_preset
    config = load_preset("tiny")
    without = config.influence.model_dump(mode="json")
    assert config.influence.LATER_KEYS == {"utility", "judge", "linear_kernel", "pad_multiple"}
    for key in config.influence.LATER_KEYS:
        without.pop(key)
    keys = tuple(f"influence.{k}" for k in type(config.influence).model_fields)
    assert config.keys_dump(keys) == {f"influence.{k}": v for k, v in without.items()}
    assert load_preset("tiny", ["influence.utility=loss"]).keys_dump(keys)["influence.utility"] == "loss"


def test_influence_compile_takes_generations_on_off_vocabulary():
    from montessori.influence.settings import InfluenceSettings
    for value in ("auto", "on", "off"):  # YAML reads an unquoted on/off as a boolean: the same word here
        assert load_preset("tiny", [f"generation.compile={value}"]).generation.compile == value
        config = load_preset("tiny", [f"influence.compile={value}"])
        assert config.influence.compile == value and InfluenceSettings.from_config(config).compile == value
    assert load_preset("tiny", ["influence.compile='off'"]).influence.compile == "off"
    assert "compile: 'on'" in load_preset("tiny", ["influence.compile=on"]).to_yaml()  # written back quoted


def test_one_judge_section_for_influence_and_eval_whose_api_key_variable_is_not_fingerprinted():
    from montessori.keys import NOT_FINGERPRINTED
    from montessori.pipeline import STAGES
    from montessori.config import JudgeConfig, config_from_dict
    judge = {"model": "judge-llm", "base_url": "http://h:8000/v1", "api_key_env": "JUDGE_KEY"}
    path_yaml = {"influence": {"utility": "judge", "judge": judge}, "eval": {"judge": {"model": "tiny-random:1"}}}
    config = config_from_dict(path_yaml)
    assert config.influence.judge == JudgeConfig(**judge)
    assert config.eval.judge == JudgeConfig(model="tiny-random:1") and Config().eval.judge == JudgeConfig()
    assert {"influence.judge.api_key_env", "eval.judge.api_key_env"} <= set(NOT_FINGERPRINTED)
    other_key = config_from_dict({**path_yaml, "influence": {"utility": "judge",
                                                             "judge": {**judge, "api_key_env": "OTHER"}}})
    other_model = load_preset("tiny", ["influence.judge.model=other"])
    for stage in STAGES:
        assert config.keys_dump(stage.keys) == other_key.keys_dump(stage.keys), stage.name
    declared = {k for stage in STAGES for k in stage.keys}
    assert {"influence.judge.model", "influence.judge.base_url", "eval.judge.model", "eval.judge.base_url"} <= declared
    assert other_model.keys_dump(("influence.judge.model",)) == {"influence.judge.model": "other"}


@pytest.mark.parametrize("old, key", [
    ("pairs.rule=sign", "pairs"), ("generation.data_max_prompts_per_pair=2", None), ("generation.seed=0", None),
    ("warmup.epochs=1", None), ("dpo.batch_size=2", None), ("dpo.grad_accum=1", None),
    ("warmup.batch_size=1", None), ("warmup.grad_accum=1", None), ("influence.judge_url=http://h/v1", None),
    ("influence.judge_model=m", None), ("eval.judge_api_key_env=KEY", None),
])
def test_old_keys_are_refused_naming_the_key(old, key):
    """The names of 0.1 and of before one name per concept (issue 25) are unknown keys, one line each."""
    key = key or old.split("=")[0]
    with pytest.raises(InputError, match=f"unknown key '{key}'$") as err:
        load_preset("tiny", [old])
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("old", ["influence.precision=bf16", "warmup.precision=fp32", "models.dtype=bf16"])
def test_old_dtype_spellings_are_refused(old):
    with pytest.raises(InputError, match=f"key '{old.split('=')[0]}'"):
        load_preset("tiny", [old])
