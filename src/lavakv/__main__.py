"""``python -m lavakv``: the command line, for launchers that start modules (``torchrun -m lavakv eval ...``)."""

import sys

from lavakv.cli import main

sys.exit(main())
