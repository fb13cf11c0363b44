"""FUSE: serving an image as a lazy, read-only filesystem (pyfuse3 on trio).

``mount``   ``casfs.mount`` / ``casfs.unmount``, mount records, the control-socket client
``daemon``  the serving process: trio loop, control socket, signals, profiles, fork/re-exec
``ops``     the pyfuse3 request handlers (inodes, reads, readahead)
``kernel``  /proc/self/mountinfo, readahead and FUSE connection tuning, lazy detach

Importing this package (or ``casfs``) does not import pyfuse3 or trio: only serving does.
"""
