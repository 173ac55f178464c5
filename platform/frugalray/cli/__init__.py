"""`frugalray` command line (`main`); `python -m frugalray` and `python -m frugalray.cli` run it too."""

from frugalray.cli.main import main

__all__ = ["main"]
