# C-level only: see dirtymap.pxd.
