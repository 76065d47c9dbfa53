"""``python -m dvmm_core.guest build [--cache-dir D] [--force]`` (same as ``dvmm guest``)."""

import sys

from dvmm_core.guest.build import main

sys.exit(main(["guest", *sys.argv[1:]]))
