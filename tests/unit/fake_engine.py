"""A stand-in for the engine deployment handle's response stream, for unit tests of the ingress's pure
decisions without Ray (a Serve handle's `.remote()` returns an async generator with `cancel()`)."""

import asyncio


class FakeStream:
    """The stream of one engine request: its one item arrives after `delay` seconds."""

    def __init__(self, item, delay: float = 0.0):
        self._items, self._delay = [item], delay

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._items:
            raise StopAsyncIteration
        if self._delay:
            await asyncio.sleep(self._delay)
        return self._items.pop()

    def cancel(self):
        pass


class FakeResponse:
    """vLLM's completions response to `payload`: n choices answering "42", with usage."""

    def __init__(self, payload):
        self._payload = payload

    def model_dump(self, mode="json"):
        n = self._payload.get("n") or 1
        return {"id": "x", "object": "text_completion", "model": self._payload["model"],
                "choices": [{"index": i, "text": "42", "logprobs": None, "finish_reason": "stop"} for i in range(n)],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2 * n, "total_tokens": 5 + 2 * n}}
