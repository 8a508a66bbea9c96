"""``python -m skinflint.cli``."""

import sys

from skinflint.cli import main

sys.exit(main())
