"""The real architectures the GPU benchmarks build with random weights (speed does not depend on
weight values): LlamaConfig keyword arguments, one table for every script under bench/."""

ARCHS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def build_model(arch: str, device="cpu", dtype=None, **config):
    """A randomly initialised LlamaForCausalLM of `arch`, the one builder of every script here: seed 0
    (every script and worker builds the same weights), built on `device` directly (an 8B model never
    exists on the host), SDPA attention, in eval mode. `config` overrides LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    fields = dict(max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlamaConfig(**{**fields, **ARCHS[arch], **config})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return (model if dtype is None else model.to(dtype)).eval()
