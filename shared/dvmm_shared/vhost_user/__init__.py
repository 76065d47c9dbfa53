"""vhost-user: wire codec (:mod:`.message`), socket with fd passing
(:mod:`.connection`), the backend daemon loop (:mod:`.daemon`) with its device
interface (:mod:`.backend`), and a frontend client (:mod:`.frontend`)."""

from .backend import BackendStats, QueueStats, VhostUserBackend
from .connection import Connection, ConnectionClosed, Message
from .daemon import Daemon, Session
from .frontend import Frontend, FrontendError, RingSetup
from .message import MemRegion, MessageError, ProtocolFeature, Request

__all__ = [
    "BackendStats", "Connection", "ConnectionClosed", "Daemon", "Frontend", "FrontendError",
    "MemRegion", "Message", "MessageError", "ProtocolFeature", "QueueStats", "Request",
    "RingSetup", "Session", "VhostUserBackend",
]
