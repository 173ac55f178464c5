"""A stand-in for the engine deployment handle's response stream, for unit tests of the ingress's pure
decisions without Ray (a Serve handle's `.remote()` returns an async generator with `cancel()`)."""


class FakeStream:
    def __init__(self, item):
        self._items = [item]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._items:
            raise StopAsyncIteration
        return self._items.pop()

    def cancel(self):
        pass
