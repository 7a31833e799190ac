"""`python -m vitkit ...` (also what `torchrun -m vitkit train ...` runs)."""

import sys

from vitkit.cli import entry

sys.exit(entry())
