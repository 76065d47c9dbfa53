"""dvmm's display process: a VNC server over guest framebuffers, virtio-gpu over vhost-user.

:mod:`.rfb` is the RFB wire format (pure: bytes in, typed messages or typed
errors out), :mod:`.pixels` and :mod:`.encoders` turn frames into a
client's pixel format and encodings, :mod:`.damage` finds what changed,
:mod:`.session` is one client's protocol state (no sockets), :mod:`.server`
the sockets; :mod:`.framebuffer` is where pictures come from (a test image,
or a scanout of guest memory), :mod:`.input` sends key and pointer events to
the core, :mod:`.device` is the virtio-gpu vhost-user backend,
:mod:`.commands` the control commands and :mod:`.main` the program.
:mod:`.des` is the DES of VNC authentication.
"""
