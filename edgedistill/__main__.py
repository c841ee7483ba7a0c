"""``python -m edgedistill``: the command line, as launchers start it
(``torchrun -m edgedistill run``, ``accelerate launch -m edgedistill run``)."""

import sys

from .cli import main

sys.exit(main())
