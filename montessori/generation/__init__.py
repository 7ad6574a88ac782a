"""Teacher data generation: instructions, responses and training data (docs/method.md, steps 1, 2 and 8).

    prompts.py   the two prompt styles (`tagged`, `list`) and their parsers
    filters.py   length / banned-word / first-character filters
    dedup.py     ROUGE-L near-duplicate filter with rouge-score's decisions, fast
    backends/    transformers, vLLM and OpenAI-compatible HTTP behind one interface
    stage.py     the stages: resumable, observable, deterministic order
    serve.py     `montessori serve MODEL`: an OpenAI-compatible server over the transformers backend
"""

from montessori.generation.dedup import RougeDeduper, dedup, dedup_tokens, rouge_l_f1, rouge_tokens
from montessori.generation.prompts import (answer_messages, build_prompt, choose_examples, detect_language,
                                           parse_completion)

__all__ = ["RougeDeduper", "answer_messages", "build_prompt", "choose_examples", "dedup", "dedup_tokens",
           "detect_language", "parse_completion", "rouge_l_f1", "rouge_tokens"]
