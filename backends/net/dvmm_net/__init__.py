"""dvmm's vhost-user-net backend (TAP and VM-to-VM links).  Not written yet:
see the project's open issues; nothing here is used."""
