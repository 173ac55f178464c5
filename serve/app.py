"""The module `serve run serve/config.yaml` imports (run from the repository root).

`build(args)` is a Ray Serve application builder: Serve passes it the `args:` mapping of
the config file, which is a frugalray `ServeConfig`.
"""

from __future__ import annotations

from typing import Any

from frugalray.config import parse_config
from frugalray.serve.app import build_app
from frugalray.serve.config import ServeConfig


def build(args: dict[str, Any]):
    cfg = parse_config(ServeConfig, dict(args or {}), source="serve/config.yaml args")
    return build_app(cfg)
