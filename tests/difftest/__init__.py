"""Differential test harness: the same random layer stack and the same random
operations on kernel overlayfs (the oracle) and on a FUSE union (unionfs, or a
peer such as fuse-overlayfs), comparing every result and the merged trees.

Modules: `generator` (seeded layer stacks, both marker formats, and the
OCI->kernel marker converter), `ops` (seeded op choice and execution),
`tree` (merged-tree snapshots and comparison), `mounts` (mount/unmount with
guaranteed teardown), `harness` (one seed end to end), `replay` (CLI).
"""
