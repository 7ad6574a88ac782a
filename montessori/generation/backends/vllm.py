"""vLLM backend, in process (extra `[vllm]`, CUDA only): the same prompts, seeds and sampling knobs."""

from __future__ import annotations

from montessori.generation.backends.base import Backend, Completion, Request, Sampling


def available() -> bool:
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch
    return torch.cuda.is_available()


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, spec: str, dtype: str = "auto", **engine_args):
        from vllm import LLM
        from montessori.models.load import resolve_model_dir
        self.llm = LLM(model=str(resolve_model_dir(spec)), dtype="auto" if dtype == "auto" else dtype,
                       **engine_args)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams
        from montessori.models.chat import prompt_text
        prompts = [prompt_text(self.tokenizer, r.messages, r.prefill) for r in requests]
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 presence_penalty=sampling.presence_penalty,
                                 repetition_penalty=sampling.repetition_penalty,
                                 max_tokens=sampling.max_new_tokens, seed=r.seed) for r in requests]
        # Token ids, not text: the chat template already holds the special tokens.
        token_prompts = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]}
                         for p in prompts]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        return [[Completion(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop")
                 for o in out.outputs] for out in outputs]
