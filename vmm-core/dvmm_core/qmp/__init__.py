"""dvmm's QMP server: QEMU's Machine Protocol in the core.

Layers, each its own module (trio-style: import the one you need; nothing
here is imported by ``dvmm run`` before the first guest instruction):

* :mod:`.stream` -- bytes to JSON values (no framing in QMP), hostile sizes;
* :mod:`.protocol` -- requests checked, replies/events/greeting encoded;
* :mod:`.session` -- one connection's negotiation state and command table;
* :mod:`.server` -- sockets: an I/O thread, an executor thread, events;
* :mod:`.commands` / :mod:`.hmp` -- what dvmm answers, in QMP and as text;
* :mod:`.vmctl` / :mod:`.inspect` / :mod:`.freeze` -- the machine's side;
* :mod:`.manager` -- what ``dvmm run`` wires: servers, events, run loop;
* :mod:`.options` / :mod:`.address` -- the ``--qmp`` command line.
"""
