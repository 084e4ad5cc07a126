"""`python -m mysproj ...`: the `mysproj` command (the images run it this way)."""

import sys

from mysproj.cli import main

sys.exit(main())
