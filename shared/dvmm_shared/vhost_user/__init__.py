"""vhost-user: wire codec (:mod:`.message`), socket with fd passing
(:mod:`.connection`), the backend daemon loop (:mod:`.daemon`) serving one
frontend connection at a time (:mod:`.session`, rings in :mod:`.vring`,
extra fds in :mod:`.watches`) with its device interface (:mod:`.backend`),
and a frontend client (:mod:`.frontend`)."""

from .backend import BackendStats, QueueStats, VhostUserBackend
from .connection import Connection, ConnectionClosed, Message
from .daemon import Daemon
from .frontend import Frontend, FrontendError, RingSetup
from .message import InflightInfo, MemRegion, MessageError, ProtocolFeature, Request
from .session import Session

__all__ = [
    "BackendStats", "Connection", "ConnectionClosed", "Daemon", "Frontend", "FrontendError",
    "InflightInfo", "MemRegion", "Message", "MessageError", "ProtocolFeature", "QueueStats",
    "Request", "RingSetup", "Session", "VhostUserBackend",
]
