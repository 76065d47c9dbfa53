"""``python -m dvmm_blk``: the same program as ``dvmm backend blk``."""

import sys

from .main import main

sys.exit(main())
