"""``python -m core`` — the old name of ``python -m refusal_lab``."""

import sys

from refusal_lab.cli import main

sys.exit(main())
