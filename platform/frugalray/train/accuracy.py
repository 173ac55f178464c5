"""Held-out accuracy of a model or of an adapter on its base, by greedy generation with transformers.

What the served engine would answer, without an engine: an adapter is put on the full-precision
base (as vLLM serves a QLoRA adapter), each question is asked once (greedy, chat template, left
padding, batched) and the reply is checked by exact match (`answers.is_correct`). Per-question
results come back in order, so two models on the same questions can be compared pairwise
(`frugalray.stats.paired_difference`).
"""

from __future__ import annotations

from typing import Any

from frugalray.examples.answers import is_correct
from frugalray.examples.formatting import chat_prompt_text
from frugalray.models import load_causal_lm, load_tokenizer


def greedy_correct(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int = 16,
                   batch_size: int = 40) -> list[bool]:
    """Per row: does the greedy reply to `row["instruction"]` state `row["answer"]`?"""
    import torch

    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [chat_prompt_text(tokenizer, r["instruction"]) for r in rows]
    replies: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
                # use_cache: training configs turn the KV cache off; generation wants it.
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True)
                replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [is_correct(text, row) for text, row in zip(replies, rows)]


class AdapterAccuracy:
    """The full-precision base, loaded once; each adapter is put on it, scored, and taken off again."""

    def __init__(self, model_path: str, rows: list[dict[str, Any]], max_new_tokens: int = 16):

        self.base = load_causal_lm(model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.rows = rows
        self.max_new_tokens = max_new_tokens

    def of_base(self) -> list[bool]:
        return greedy_correct(self.base, self.tokenizer, self.rows, self.max_new_tokens)

    def of_adapter(self, adapter_dir: str) -> list[bool]:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(self.base, adapter_dir)
        try:
            return greedy_correct(tuned, self.tokenizer, self.rows, self.max_new_tokens)
        finally:
            self.base = tuned.unload()  # the base without the adapter's layers, for the next one

    def of_session(self, session: Any) -> list[bool]:
        """The adapter a TrainingSession holds now (saved to a scratch directory, adapter weights only)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            session.model.save_pretrained(tmp, safe_serialization=True)
            return self.of_adapter(tmp)
