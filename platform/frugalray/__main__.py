"""`python -m frugalray ...` is the `frugalray` command."""

import sys

from frugalray.cli.main import main

sys.exit(main())
