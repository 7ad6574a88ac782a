from montessori.models.chat import IGNORE_INDEX, encode_example, prompt_text


def test_labels_mask_exactly_the_prompt(tokenizer):
    messages = [{"role": "user", "content": "Name a prime number."}]
    ids, labels = encode_example(tokenizer, messages, "Seven is prime.")
    prompt_ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("Seven is prime.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt_ids + response_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == response_ids
    # The chat template really is applied: the prompt ends with the assistant header.
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Seven is prime.<|im_end|>"


def test_prefill_is_part_of_the_prompt(tokenizer):
    messages = [{"role": "user", "content": "List tasks."}]
    ids, labels = encode_example(tokenizer, messages, " Write a poem.", prefill="9.")
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == " Write a poem.<|im_end|>"
    assert tokenizer.decode(ids[: len(ids) - len(answer)]).endswith("assistant\n9.")


def test_truncation_cuts_the_response_and_can_leave_none(tokenizer):
    messages = [{"role": "user", "content": "Count."}]
    n_prompt = len(tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"])
    ids, labels = encode_example(tokenizer, messages, "one two three four five six", max_length=n_prompt + 3)
    assert len(ids) == len(labels) == n_prompt + 3
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "one two three"
    ids, labels = encode_example(tokenizer, messages, "one", max_length=n_prompt - 1)
    assert all(label == IGNORE_INDEX for label in labels)
