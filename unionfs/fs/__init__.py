"""The filesystem itself: layers, whiteouts, the node table, copy-up and the
POSIX operations of the merged view. Standard library (and xxhash) only:
nothing here imports trio or pyfuse3, so every rule runs on temporary
directories without a kernel mount."""
