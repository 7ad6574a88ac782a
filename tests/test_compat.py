"""montessori.compat on whichever end of the supported range is installed (`make test` runs both)."""

from __future__ import annotations

import warnings

import pytest

from montessori.compat import checkpointing_args, enable_checkpointing


@pytest.mark.parametrize("enabled", [True, False])
def test_checkpointing_args_reach_the_trainer_config(tmp_path, enabled):
    from trl import DPOConfig, SFTConfig
    for config_class in (DPOConfig, SFTConfig):
        args = config_class(output_dir=str(tmp_path), report_to="none", use_cpu=True, **checkpointing_args(enabled))
        # the new name where it exists, else the old one; either way the trainer reads this value
        on = getattr(args, "activation_checkpointing", None)
        assert (args.gradient_checkpointing if on is None else on) is enabled


def test_enable_checkpointing_turns_it_on_without_a_deprecation_warning(tiny_model):
    model, _ = tiny_model

    def checkpointing() -> bool:  # the property is renamed like the method (the old name warns)
        name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
            "is_gradient_checkpointing"
        return getattr(model, name)

    assert not checkpointing()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_checkpointing(model)
    assert checkpointing()
