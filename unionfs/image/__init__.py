"""Images: a content-addressed store, OCI/Docker formats, the layer applier,
load/save of archives, commit of a container's upper. See docs/images.md.

Nothing here is imported by `unionfs mount` or the filesystem core; heavy
libraries (isal, zstandard) are imported only where a layer is (de)compressed.
"""
