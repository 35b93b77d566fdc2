"""The pyfuse3 adapter: FUSE requests in, calls on the filesystem's façade,
replies out; and the copier that runs copy-ups in worker threads."""
