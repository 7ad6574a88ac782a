"""Models: one resolver for every model spec, device/dtype choice, and the chat/masking helper."""

from montessori.models.chat import encode_example, prompt_text
from montessori.models.load import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model_dir

__all__ = ["encode_example", "prompt_text", "load_model", "load_tokenizer", "resolve_device",
           "resolve_dtype", "resolve_model_dir"]
