"""Child processes for tests: the shared implementation in :mod:`dvmm_shared.procs`."""

from dvmm_shared.procs import log_tail, spawn, stop, wait_exit

__all__ = ["log_tail", "spawn", "stop", "wait_exit"]
