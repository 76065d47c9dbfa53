"""The fuzzing child: ``python -m dvmm_core.chaos.fuzz.run TARGET [libFuzzer flags] [CORPUS]``.

Owns one libFuzzer run in this process: the target's dvmm modules are
imported under atheris' instrumentation (coverage feedback), logging is
silenced (a refused input logs a warning; millions of them would be the
run's cost), and libFuzzer takes over; it exits the process itself -- 0
when the budget ran out, non-zero with the crashing input saved under its
``-artifact_prefix`` on an uncaught exception, a deadly signal, a timeout
or the RSS limit.  :mod:`.runner` starts this and reads what it prints.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile

from . import INSTRUMENTED, NOT_INSTRUMENTED, TARGETS
from ._atheris import fuzz, instrumented


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(f"usage: python -m dvmm_core.chaos.fuzz.run TARGET [libFuzzer flags]; "
              f"targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    spec = TARGETS[argv[1]]
    logging.disable(logging.CRITICAL)
    work = os.environ.get("DVMM_FUZZ_WORK") or tempfile.mkdtemp(prefix="dvmm-fuzz-")
    module = importlib.import_module(f"{__package__}.{spec.module}")
    with instrumented(INSTRUMENTED, NOT_INSTRUMENTED):
        for name in spec.imports:  # imported here, so instrumented
            importlib.import_module(name)
    one_input = module.target(spec.arg, work)
    fuzz([argv[0], *argv[2:]], one_input)
    return 0  # not reached: libFuzzer exits


if __name__ == "__main__":
    sys.exit(main(sys.argv))
