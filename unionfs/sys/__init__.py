"""The kernel interfaces the os module lacks: every ctypes call (libc) and
the mount-table reader."""
