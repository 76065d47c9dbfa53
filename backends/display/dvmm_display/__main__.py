"""``python -m dvmm_display``: the same program as ``dvmm backend display``."""

import sys

from .main import main

sys.exit(main())
