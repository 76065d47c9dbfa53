"""The catalogue of a chaos campaign: fault types, workloads and VM kinds.

Owns what ``dvmm chaos list`` shows and what a scenario may name: each
:class:`FaultType` says whether its fault model lets the guest see an error
(``surfaces``), whether it loses and restores the backend's vhost-user
link (``restores``: recovery then waits for ``device-restored``), which
device kinds it can hit and on which VM kinds, and what it needs (the
docker runner).  Each :data:`WORKLOADS` entry names the target it drives.
The injectors are :mod:`.faults` and its families; the seeded parameters
of each type are :mod:`.schedule`'s.  Nothing here starts anything.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_DEVICES = ("blk", "net", "display")
BOTH_VMS = ("core", "qemu")


@dataclass(frozen=True)
class FaultType:
    name: str
    surfaces: bool                   # the fault model lets the guest see an error
    restores: bool                   # the backend's link is lost and restored
    help: str
    devices: tuple[str, ...] = ("blk",)   # device kinds it can hit
    vms: tuple[str, ...] = ("core",)      # VM kinds it runs on
    needs: str = ""                       # "docker": the backends run under the docker runner
    family: str = "process"               # for the summary: process, block, channel, ...


_TYPES = (
    # -- process (faults.py) ---------------------------------------------------------
    FaultType("sigkill", False, True, "SIGKILL the backend (its supervisor restarts it, the "
              "link reconnects and replays in-flight requests)", ALL_DEVICES, BOTH_VMS),
    FaultType("hang", False, False, "SIGSTOP the backend, SIGCONT it 100-800 ms later",
              ALL_DEVICES, BOTH_VMS),
    FaultType("restart", False, True, "stop the backend cleanly (SIGTERM) and start it again",
              ALL_DEVICES, BOTH_VMS),
    FaultType("crash-at", False, True, "the backend SIGKILLs itself at a named point of its "
              "next request (after-pop, after-data, before-used, after-used)",
              ("blk",), BOTH_VMS),
    FaultType("memlimit", False, False, "the backend's address space is capped at its "
              "current size (RLIMIT_AS, soft) for 0.3-1 s: every allocation fails",
              ALL_DEVICES, BOTH_VMS),
    # -- block engine (faults.py, faults_io.py) ----------------------------------------
    FaultType("eio", True, False, "the next disk read fails with EIO: the guest sees a read "
              "error (allowed) and retries", ("blk",), BOTH_VMS, family="block"),
    FaultType("latency", False, False, "every ring service pass sleeps 50-400 ms for 0.3-1 s "
              "(a latency spike)", ("blk",), BOTH_VMS, family="block"),
    FaultType("short-read", False, False, "the next disk reads transfer only part of their "
              "bytes (the engine must carry on, the guest sees nothing)", ("blk",), BOTH_VMS,
              family="block"),
    FaultType("short-write", False, False, "the next disk writes transfer only part of their "
              "bytes (the engine must carry on, the guest sees nothing)", ("blk",), BOTH_VMS,
              family="block"),
    FaultType("enospc", True, False, "the next disk write fails with ENOSPC: the guest sees a "
              "write error (allowed) and retries", ("blk",), BOTH_VMS, family="block"),
    FaultType("torn-write", False, True, "the next disk write stores only part of its data, "
              "then the backend dies: the restarted one replays the request in full",
              ("blk",), BOTH_VMS, family="block"),
    # -- channel (faults.py, faults_io.py) ---------------------------------------------
    FaultType("close-socket", False, True, "the backend closes its vhost-user socket (the "
              "frontend reconnects)", ALL_DEVICES, BOTH_VMS, family="channel"),
    FaultType("drop-kick", False, False, "the backend loses the next kick (doorbell) of a "
              "queue: its lost-kick safety net must find the work", ("blk",), BOTH_VMS,
              family="channel"),
    FaultType("delay-kick", False, False, "the backend sees the next kick 50-400 ms late",
              ("blk",), BOTH_VMS, family="channel"),
    FaultType("drop-call", False, False, "the backend does not signal the next call "
              "(interrupt): its safety net signals it again", ("blk",), BOTH_VMS,
              family="channel"),
    FaultType("delay-call", False, False, "the backend signals the next call 50-400 ms late",
              ("blk",), BOTH_VMS, family="channel"),
    FaultType("corrupt-msg", False, True, "the core sends the backend one corrupted "
              "vhost-user message: the backend refuses it and drops the session, the core "
              "reconnects and replays", ("blk",), ("core",), family="channel"),
    # -- network (faults_net.py) -------------------------------------------------------
    FaultType("net-drop", False, False, "the net backend drops frames for a while (TCP "
              "retransmits)", ("net",), ("qemu",), family="network"),
    FaultType("net-dup", False, False, "the net backend duplicates frames for a while",
              ("net",), ("qemu",), family="network"),
    FaultType("net-reorder", False, False, "the net backend reorders frames for a while",
              ("net",), ("qemu",), family="network"),
    FaultType("net-corrupt", False, False, "the net backend corrupts frames for a while "
              "(checksums drop them, TCP retransmits)", ("net",), ("qemu",), family="network"),
    FaultType("link-flap", False, False, "the link goes down, then up again", ("net",),
              ("qemu",), family="network"),
    # -- container and cgroup (faults_container.py) ------------------------------------
    FaultType("docker-kill", False, True, "docker kill the backend's container (the "
              "supervisor starts a new one)", ("blk",), ("core",), "docker", "container"),
    FaultType("docker-pause", False, False, "docker pause the backend's container, unpause "
              "it 100-800 ms later", ("blk",), ("core",), "docker", "container"),
    FaultType("cgroup-memlimit", False, False, "the backend's cgroup v2 memory.max is set "
              "just above its usage for 0.3-1 s (reclaim; an OOM kill is restarted)",
              ALL_DEVICES, ("core",), family="process"),
)

FAULTS: dict[str, FaultType] = {f.name: f for f in _TYPES}


@dataclass(frozen=True)
class Workload:
    name: str
    vm: str          # the VM kind that runs it
    target: str      # the backend it drives
    help: str


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("blk", "core", "blk0", "SeaBIOS boots a program that reads one disk region "
             "through int 13h for ever, comparing every read with the first (oracle: no read "
             "differs; a read error only while an EIO is armed; the image's data unchanged "
             "at the end)"),
    Workload("blk-write", "core", "blk0", "SeaBIOS boots a program that writes numbered "
             "sectors in turn to 16 slots through int 13h and reads each back (oracle: every "
             "read-back equal; an I/O error only while an error is armed; after the VM "
             "stopped, the image holds 16 intact, consecutive writes, none older than the "
             "guest verified)"),
    Workload("display", "core", "display0", "the display backend shows SeaBIOS's ramfb "
             "screen over VNC (oracle: after each display fault, a VNC capture equals the "
             "framebuffer the guest drew, read from guest RAM)"),
    Workload("blkverify", "qemu", "blk0", "the Debian guest's blkverify writes, flushes and "
             "re-reads numbered, checksummed 4 KiB blocks with O_DIRECT on a qcow2 image "
             "(oracle: every block verifies; qemu-img check clean at the end)"),
    Workload("net-stream", "qemu", "net0", "a sequenced, checksummed TCP stream from the "
             "guest to a receiver on the host side of a TAP device (oracle: every record "
             "verifies, the sequence has no gap)"),
)}

VMS = {"core": "the dvmm core (KVM) with SeaBIOS and dvmm backends (blk; display with the "
               "display workload)",
       "qemu": "QEMU (TCG) with the dvmm Debian test guest and dvmm blk and net backends"}
RUNNERS = ("process", "bwrap", "docker")
