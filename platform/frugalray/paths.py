"""Where frugalray keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def frugalray_home() -> Path:
    """Cache root: `$FRUGALRAY_HOME`, else `~/.cache/frugalray`."""
    env = os.environ.get("FRUGALRAY_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "frugalray"


def models_dir() -> Path:
    return frugalray_home() / "models"
