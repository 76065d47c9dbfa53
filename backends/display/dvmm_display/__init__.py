"""dvmm's vhost-user-gpu display backend (virtio-gpu 2D + VNC).  Not written
yet: see the project's open issues; nothing here is used."""
