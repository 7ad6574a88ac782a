"""What a stage is and what it is given: imported by the runner (`montessori.pipeline`) and by the
executors (`montessori.executors`), and importing neither, so neither imports the other."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from montessori.config import Config
from montessori.errors import MontessoriError
from montessori.store import RunStore, StageDir


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported when the stage runs
    keys: tuple[str, ...]  # dotted config keys the stage reads (`sft.lr`): their values are fingerprinted
    inputs: tuple[str, ...] = ()  # stages of the same round whose output it reads
    round_inputs: tuple[str, ...] = ()  # stages of the previous round it reads (teacher, student)
    files: tuple[str, ...] = ()  # keys among `keys` naming input files: fingerprinted by content

    def function(self) -> Callable[[StageContext], dict]:
        return load_function(self.name, self.target)


def load_function(name: str, target: str) -> Callable:
    """The stage's function. Only a missing module or function means "not implemented"; an import
    that fails inside the module is shown with its cause (a missing package, a syntax error)."""
    module, func = target.split(":")
    try:
        loaded = importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None)
        if isinstance(err, ModuleNotFoundError) and missing and (module + ".").startswith(missing + "."):
            raise NotImplementedError(name) from None  # the stage's own module is not there
        raise MontessoriError(f"stage '{name}': importing {module} failed: {err}") from err
    if not hasattr(loaded, func):
        raise NotImplementedError(name)
    return getattr(loaded, func)


@dataclass
class StageContext:
    """What a stage gets: the config, its folder, and where to find its inputs."""

    config: Config
    store: RunStore
    round: int
    stage: StageDir
    active: tuple[str, ...] = field(default_factory=tuple)
    progress: bool = True
    # The generation backend for a model spec, when an executor runs generation elsewhere (Ray engines:
    # executors.launcher); None: the stage builds generation.backend in this process.
    make_backend: Callable[[str], Any] | None = None

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"montessori.{self.stage.stage}")

    def input(self, name: str, round: int | None = None) -> StageDir:
        return self.store.stage(self.round if round is None else round, name)

    def teacher_spec(self, after_dpo: bool = False) -> str:
        """The teacher of this round: the base teacher in round 1, else last round's DPO output.

        With after_dpo=True: this round's DPO output (used by the `dataset` stage)."""
        source = self.round if after_dpo else self.round - 1
        if source >= 1 and "dpo" in self.active:
            return str(self.store.stage(source, "dpo").path / "model")
        return self.config.models.teacher

    def student_spec(self) -> str:
        """The student entering this round: the base student in round 1, else last round's SFT output."""
        if self.round > 1:
            return str(self.store.stage(self.round - 1, "sft").path / "model")
        return self.config.models.student

    def base_student_spec(self) -> str:
        # docs/method.md, step 9: SFT starts from the *base* student of the round (= the student entering it).
        return self.student_spec()
