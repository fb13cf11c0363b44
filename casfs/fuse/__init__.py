"""FUSE: serving an image as a lazy, read-only filesystem (pyfuse3 on trio).

``casfs.fuse.mount`` starts, tunes, controls and stops mounts (``casfs.mount`` and
``casfs.unmount`` are its public face); ``casfs.fuse.ops`` holds the request handlers. Importing
this package does not import pyfuse3 or trio (only serving a mount does).
"""
