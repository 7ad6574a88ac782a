"""montessori: synthetic instruction-tuning data tailored to the student model that learns from it."""

__version__ = "0.2.0"

from montessori.config import Config, load_config, load_preset  # noqa: E402

__all__ = ["Config", "load_config", "load_preset", "__version__"]
