"""`python -m rto <command>`, also under `torchrun -m rto`."""

import sys

from rto.cli import main

sys.exit(main())
