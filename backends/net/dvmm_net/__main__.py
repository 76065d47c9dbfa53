"""``python -m dvmm_net``: the same program as ``dvmm backend net``."""

import sys

from .main import main

sys.exit(main())
