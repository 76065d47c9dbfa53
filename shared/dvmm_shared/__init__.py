"""dvmm's common library: virtio definitions, guest memory, split virtqueues,
and the vhost-user protocol (wire codec, connection, backend daemon loop and a
frontend client).  Device backends and the core build on it; nothing here
does device I/O.
"""
