"""`python -m dsv3 <verb> ...`, the same as `dsv3 <verb> ...`."""

import sys

from dsv3.cli import main

sys.exit(main())
