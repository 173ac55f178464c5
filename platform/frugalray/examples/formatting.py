"""How an example becomes tokens: shared by scoring, training and evaluation.

An example has a `prompt` (instruction plus optional input; may be empty) and a
`response`. With a prompt, the text is the tokenizer's chat template for one user turn
followed by the response and the end-of-turn token, and only response tokens carry a
loss (labels are -100 elsewhere) — the same template vLLM applies when serving chat, so
what is trained is what is served. Without a prompt, every token carries a loss.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def join_prompt(instruction: str | None, input_text: str | None = None) -> str:
    instruction = (instruction or "").strip()
    input_text = (input_text or "").strip()
    if instruction and input_text:
        return f"{instruction}\n\n{input_text}"
    return instruction or input_text


def chat_prompt_text(tokenizer: Any, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{prompt}\n"


def tokenize_example(tokenizer: Any, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (response tokens only when there is a prompt), truncated to max_length."""
    eos = tokenizer.eos_token or ""
    if prompt:
        prompt_ids = tokenizer(chat_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        input_ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    else:
        input_ids = tokenizer(response + eos, add_special_tokens=False)["input_ids"][:max_length]
        labels = list(input_ids)
    return {"input_ids": input_ids, "labels": labels}


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of tokenized examples into tensors (input_ids, attention_mask, labels)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
