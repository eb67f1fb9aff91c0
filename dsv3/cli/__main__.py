"""`python -m dsv3.cli <verb> ...`, the same as `dsv3 <verb> ...` (and what `torchrun -m dsv3.cli train` runs)."""

import sys

from dsv3.cli import main

sys.exit(main())
