import sys

from frugalray.cli.main import main

sys.exit(main())
