"""How influence is computed: the engine's knobs, spelled once.

The stage, `compute_influence`, the Ray scorer and `build_scorer` all pass one InfluenceSettings;
the config keys (influence.*, documented in config.py) are the same names. Defaults are the config's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class InfluenceSettings:
    estimator: str = "linear"  # linear: −∇L_ref·Δ_z; exact: take the step, evaluate (core.py)
    precision: str = "float32"  # the reference pass (exact: the losses; linear: ∇L_ref)
    grad_precision: str = "auto"  # the candidate's gradient; auto: bfloat16 for linear on CUDA, else float32
    eval_batch_size: int = 8
    max_length: int = 1024  # candidate tokens
    reference_max_length: int | None = None  # reference tokens; None: max_length
    lr: float | None = None  # the probing step's lr; None: the warm-up optimizer's next lr
    compile: str = "auto"  # on: torch.compile the eager passes and the fast copy; off; auto (engine.py)
    device: str = "auto"  # where a worker loads the warm-up state (the engine uses the model's device)
    ref_grad_dtype: str = "auto"
    shadow: str = "auto"
    linear_kernel: str = "auto"
    pad_multiple: int = 64

    @classmethod
    def from_config(cls, config) -> InfluenceSettings:
        """From a Config: influence.* by name, data.reference_max_length, models.device."""
        knobs = {f.name: getattr(config.influence, f.name) for f in fields(cls) if hasattr(config.influence, f.name)}
        return cls(**knobs, reference_max_length=config.data.reference_max_length, device=config.models.device)

    def resolve(self, device) -> InfluenceSettings:
        """The settings as they run on `device` (a torch.device): grad_precision auto decided."""
        if self.grad_precision != "auto":
            return self
        cuda_linear = self.estimator == "linear" and device.type == "cuda"
        return replace(self, grad_precision="bfloat16" if cuda_linear else "float32")
