"""Entry replies whose FUSE node id is not the inode number they report.

The kernel keeps the two apart (struct fuse_entry_out has `nodeid` and
`attr.ino`, and stat shows attr.ino), and unionfs needs them apart: node ids
must never be reused while the kernel may hold the old one, while st_ino
must be the origin's, stable across copy-up and remount. pyfuse3's
EntryAttributes sets both from its one `st_ino` property. So after setting
st_ino, `set_node_id` writes the node id into the entry's `ino` field
directly. That field's place in the object (the first member of the
fuse_entry_param the object embeds, followed by `generation` and the stat
whose st_ino the property also sets) is found once, at import, by setting
known values through the properties and looking for them; if it cannot be
found, importing this module fails with one clear line instead of serving
wrong inode numbers.
"""
import ctypes

import pyfuse3

_INO_MARK = 0x5EED0F1DE5_0001
_GEN_MARK = 0x5EED0F1DE5_0002
_SCAN_WORDS = 24


def _find_ino_offset() -> int:
    probe = pyfuse3.EntryAttributes()
    probe.st_ino = _INO_MARK
    probe.generation = _GEN_MARK
    words = (ctypes.c_uint64 * _SCAN_WORDS).from_address(id(probe))
    for i in range(2, _SCAN_WORDS - 3):
        # fuse_entry_param: ino, generation, then struct stat (st_dev, st_ino, ...)
        if words[i] == _INO_MARK and words[i + 1] == _GEN_MARK and words[i + 3] == _INO_MARK:
            offset = i * 8
            ctypes.c_uint64.from_address(id(probe) + offset).value = 12345
            if probe.st_ino == 12345:       # the property reads the field we found
                return offset
    raise ImportError(f"pyfuse3 {pyfuse3.__version__}: the layout of EntryAttributes is not "
                      "the one unionfs knows (it cannot report node ids apart from st_ino)")


_INO_OFFSET = _find_ino_offset()
_u64_at = ctypes.c_uint64.from_address


def set_node_id(attrs: pyfuse3.EntryAttributes, node_id: int) -> None:
    """Make the entry reply name node `node_id`, keeping the st_ino it reports."""
    _u64_at(id(attrs) + _INO_OFFSET).value = node_id
