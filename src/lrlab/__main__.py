"""``python -m lrlab``: the ``lrlab`` command, also as torchrun starts it
(``torchrun --nproc-per-node=N -m lrlab run RECIPE``)."""

import sys

from lrlab.cli import main

sys.exit(main())
