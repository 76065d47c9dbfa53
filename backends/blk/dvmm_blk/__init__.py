"""dvmm's vhost-user-blk backend: a block device served out of process.

:mod:`.request` turns a descriptor chain into a typed request (pure),
:mod:`.disk` does the file I/O, :mod:`.device` ties them to the vhost-user
daemon, :mod:`.main` is the ``dvmm backend blk`` program.
"""
