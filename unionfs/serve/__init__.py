"""Serving a stack: mount options and configuration, checks, the trio server,
and the lifecycle of server processes."""
