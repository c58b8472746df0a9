"""``python -m gptlab.cli``: the ``gptlab`` command (what ``torchrun -m gptlab.cli`` launches on every rank)."""

import sys

from . import main

sys.exit(main())
