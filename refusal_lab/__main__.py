import sys

from refusal_lab.cli import main

sys.exit(main())
