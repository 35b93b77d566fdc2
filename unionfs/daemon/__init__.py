"""The daemon: servers started ahead of need, mounts handed to them over a
socket (the client mounts in its own namespaces and passes descriptors), a
control API (HTTP/1.1 + JSON on a UNIX socket), and the records that let a
restarted daemon find its servers again. docs/api.md describes the API;
docs/architecture.md the processes."""
