"""dvmm's vhost-user-net backend: a virtio-net device served out of process.

:mod:`.header` and :mod:`.request` parse the virtio-net header and the
control commands (pure); :mod:`.link` is the interface to the outside,
implemented by :mod:`.tap` (a TAP interface) and :mod:`.peer` (a socket to
another VM's backend); :mod:`.rx` and :mod:`.tx` move frames between the
rings and the link for each :mod:`.pair`; :mod:`.device` ties them to the
vhost-user daemon; :mod:`.main` is the ``dvmm backend net`` program.
"""

from .device import NetDevice
from .link import Link, LinkChanged, LinkDown, LinkError
from .peer import PeerLink
from .stats import NetStats, PairStats
from .tap import TapLink

__all__ = ["Link", "LinkChanged", "LinkDown", "LinkError", "NetDevice", "NetStats",
           "PairStats", "PeerLink", "TapLink"]
