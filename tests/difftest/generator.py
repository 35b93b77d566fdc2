"""Seeded random layer stacks, and the OCI -> kernel whiteout converter.

`generate_stack(seed, root)` writes 2-4 lower layers and an upper layer under
`root`, byte-for-byte the same for the same seed (content, modes, owners,
xattrs, times), so each side of a comparison gets its own identical copy.
Layers mix both marker formats: kernel (char 0/0 whiteout,
`trusted.overlay.opaque=y`) and OCI (`.wh.NAME`, `.wh..wh..opq`).

`convert_oci_to_kernel(layer)` rewrites a layer's OCI markers into kernel
form in place, for kernel overlayfs, which does not read the OCI form.
"""
import os
import random
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

OCI_PREFIX = ".wh."
OCI_OPAQUE = ".wh..wh..opq"
KERNEL_OPAQUE_XATTR = "trusted.overlay.opaque"

# Every generated and operated-on name comes from this small universe, so that
# layers overlap (whiteouts hide something, dirs merge, types conflict).
TOP_NAMES = ["a", "b", "c", "d", "e", "f", "g", "h"]
MID_NAMES = ["x", "y", "z", "w"]
LEAF_NAMES = ["p", "q"]


def _universe():
    paths = []
    for t in TOP_NAMES:
        paths.append(t)
        for m in MID_NAMES:
            paths.append(f"{t}/{m}")
            for leaf in LEAF_NAMES:
                paths.append(f"{t}/{m}/{leaf}")
    return paths


UNIVERSE = _universe()

# Generated times lie around 2001-2002; op-set explicit times around 2004.
# Anything at or above NOW_THRESHOLD_NS was set by the clock during the run.
GENERATED_TIME_BASE = 1_000_000_000
NOW_THRESHOLD_NS = 1_500_000_000 * 10**9

FILE_MODES = [0o644, 0o644, 0o600, 0o755, 0o444, 0o4755, 0o2755, 0o6755, 0o640]
DIR_MODES = [0o755, 0o755, 0o700, 0o1777, 0o2775, 0o555, 0o775]
FIFO_MODES = [0o644, 0o600, 0o666]
OWNERS = [(0, 0), (0, 0), (1000, 1000), (1001, 1001), (1000, 1001)]


@dataclass
class Stack:
    """Where one copy of a generated stack lives."""
    root: Path
    lowers: list  # top first
    upper: Path
    work: Path
    mnt: Path
    upper_oci_markers: set = field(default_factory=set)  # relpaths of OCI markers in upper
    upper_marker_inos: set = field(default_factory=set)  # their st_ino (set by the harness)


def _times_for(layer_name, rel):
    h = zlib.crc32(f"{layer_name}/{rel}".encode())
    sec = GENERATED_TIME_BASE + (h % 50_000_000)
    ns = sec * 10**9 + (h % 1000) * 1000
    return ns


def _make_file(rng, path, sparse):
    with open(path, "wb") as f:
        if sparse:
            # data islands separated by holes, ending in a hole
            total = rng.choice([1 << 20, 3 << 20])
            for _ in range(rng.randint(1, 3)):
                off = rng.randrange(0, total, 4096)
                f.seek(off)
                f.write(rng.randbytes(rng.choice([1, 100, 4096, 9000])))
            f.truncate(total)
        else:
            size = rng.choice([0, 0, 1, 17, 100, 4096, 5000, 70000])
            f.write(rng.randbytes(size))


def _rel_target(rng, link_rel):
    """A symlink target that stays inside the union (no escape via '..')."""
    parent = os.path.dirname(link_rel)
    choice = rng.random()
    if choice < 0.15:
        return "/nonexistent-difftest/" + rng.choice(TOP_NAMES)  # absolute, dangling
    if choice < 0.25:
        return "missing-" + rng.choice(MID_NAMES)  # relative, dangling
    target = rng.choice(UNIVERSE)
    return os.path.relpath(target, parent or ".")


def _set_xattrs(rng, path, kind):
    if kind in ("file", "dir") and rng.random() < 0.3:
        os.setxattr(path, "user.k", rng.randbytes(rng.choice([1, 8, 40])).hex().encode(),
                    follow_symlinks=False)
    if kind in ("file", "dir", "symlink") and rng.random() < 0.2:
        os.setxattr(path, "trusted.t", f"t{rng.randrange(100)}".encode(), follow_symlinks=False)


def _populate(rng, layer_dir, layer_name, n_entries, oci_markers, below_dirs):
    """Write one layer; `below_dirs` are the dirs the layers beneath it hold."""
    created = {}  # relpath -> kind
    files = []  # relpaths of regular files (hard link sources)
    opaque = set()

    def whiteout_allowed(rel):
        # The kernel lists a whiteout in readdir (and ENOENTs its lookup) when
        # its dir is not merged with one below; real layers never hold such
        # whiteouts, so the generator does not make them.
        parent = os.path.dirname(rel)
        return parent == "" or (parent in below_dirs and parent not in opaque)

    def make_parents(rel):
        parts = rel.split("/")[:-1]
        for i in range(len(parts)):
            anc = "/".join(parts[: i + 1])
            kind = created.get(anc)
            if kind is None:
                os.mkdir(layer_dir / anc, 0o755)
                created[anc] = "dir"
            elif kind != "dir":
                return False
        return True

    kinds = ["file"] * 28 + ["sparse"] * 4 + ["dir"] * 14 + ["symlink"] * 14 + \
        ["hardlink"] * 6 + ["fifo"] * 3 + ["chardev"] * 1 + ["socket"] * 1 + \
        ["wh_kernel"] * 8 + ["wh_oci"] * 8 + \
        ["opaque_kernel"] * 4 + ["opaque_oci"] * 4 + ["wh_oci_shadowed"] * 3
    for _ in range(n_entries):
        rel = rng.choice(UNIVERSE)
        kind = rng.choice(kinds)
        if kind.startswith("wh_") and not whiteout_allowed(rel):
            kind = "file"
        if rel in created or not make_parents(rel):
            continue
        path = layer_dir / rel
        name = os.path.basename(rel)
        parent = os.path.dirname(rel)
        if kind in ("file", "sparse"):
            _make_file(rng, path, sparse=(kind == "sparse"))
            created[rel] = "file"
            files.append(rel)
        elif kind in ("dir", "opaque_kernel", "opaque_oci"):
            os.mkdir(path, 0o755)
            created[rel] = "dir"
            if kind == "opaque_kernel":
                os.setxattr(path, KERNEL_OPAQUE_XATTR, b"y")
                opaque.add(rel)
            elif kind == "opaque_oci":
                (path / OCI_OPAQUE).touch()
                oci_markers.add(f"{rel}/{OCI_OPAQUE}")
                created[f"{rel}/{OCI_OPAQUE}"] = "marker"  # so that it gets fixed times too
                opaque.add(rel)
        elif kind == "symlink":
            os.symlink(_rel_target(rng, rel), path)
            created[rel] = "symlink"
        elif kind == "hardlink":
            if not files:
                continue
            os.link(layer_dir / rng.choice(files), path)
            created[rel] = "file"
        elif kind == "fifo":
            os.mkfifo(path, 0o644)
            created[rel] = "fifo"
        elif kind == "chardev":  # /dev/null's numbers: harmless to open, read and write
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            created[rel] = "chardev"
        elif kind == "socket":
            os.mknod(path, stat.S_IFSOCK | 0o755)
            created[rel] = "socket"
        elif kind == "wh_kernel":
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            created[rel] = "whiteout"
        elif kind == "wh_oci":
            marker = os.path.join(parent, OCI_PREFIX + name)
            os.close(os.open(layer_dir / marker, os.O_CREAT | os.O_WRONLY, 0o644))
            created[rel] = "whiteout"
            created[marker] = "marker"
            oci_markers.add(marker)
        elif kind == "wh_oci_shadowed":
            # NAME and .wh.NAME in one layer: the whiteout hides lower layers only
            if rng.random() < 0.5:
                os.mkdir(path, 0o755)
                created[rel] = "dir"
                opaque.add(rel)
            else:
                _make_file(rng, path, sparse=False)
                created[rel] = "file"
                files.append(rel)
            marker = os.path.join(parent, OCI_PREFIX + name)
            os.close(os.open(layer_dir / marker, os.O_CREAT | os.O_WRONLY, 0o644))
            created[marker] = "marker"
            oci_markers.add(marker)

    # metadata pass, in a fixed order: owners, then modes (chown clears suid), xattrs
    for rel in sorted(created):
        kind = created[rel]
        if kind in ("whiteout", "marker"):
            continue
        path = layer_dir / rel
        uid, gid = rng.choice(OWNERS)
        os.chown(path, uid, gid, follow_symlinks=False)
        if kind == "file":
            os.chmod(path, rng.choice(FILE_MODES))
        elif kind == "dir":
            os.chmod(path, rng.choice(DIR_MODES))
        elif kind in ("fifo", "chardev", "socket"):
            os.chmod(path, rng.choice(FIFO_MODES))
        _set_xattrs(rng, path, kind)
    # times last, deepest first, so creating children does not disturb them
    for rel in sorted(created, key=lambda r: (-r.count("/"), r)):
        if not os.path.lexists(layer_dir / rel):
            continue  # an OCI whiteout's NAME: only its marker exists
        ns = _times_for(layer_name, rel)
        os.utime(layer_dir / rel, ns=(ns, ns), follow_symlinks=False)
    return created, opaque


def _apply_layer(merged, created, opaque):
    """Update `merged` (relpath -> kind of the union so far) with a layer on top."""
    def drop_below(rel):
        for r in [r for r in merged if r.startswith(rel + "/")]:
            del merged[r]

    for rel in sorted(created, key=lambda r: r.count("/")):
        kind = created[rel]
        if kind == "marker":
            continue
        if kind == "whiteout":
            merged.pop(rel, None)
            drop_below(rel)
        elif kind == "dir":
            if rel in opaque or merged.get(rel, "dir") != "dir":
                drop_below(rel)
            merged[rel] = "dir"
        else:
            merged[rel] = kind
            drop_below(rel)


def generate_stack(seed, root, nlowers=None):
    """Write a seeded stack under `root`; return its Stack (mountpoint not mounted)."""
    rng = random.Random(f"difftest-stack-{seed}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    nlowers = nlowers or rng.randint(2, 4)
    lowers = [root / f"lower{i}" for i in range(1, nlowers + 1)]
    upper, work, mnt = root / "upper", root / "work", root / "mnt"
    for d in lowers + [upper, work, mnt]:
        d.mkdir(exist_ok=True)  # a lower may be a mounted tmpfs already (split_fs)
    merged = {}
    # bottom layer first; the upper is written last and more sparsely
    for i in reversed(range(nlowers)):
        below_dirs = {rel for rel, kind in merged.items() if kind == "dir"}
        created, opaque = _populate(rng, lowers[i], f"lower{i + 1}", rng.randint(12, 30),
                                    set(), below_dirs)
        _apply_layer(merged, created, opaque)
    upper_markers = set()
    below_dirs = {rel for rel, kind in merged.items() if kind == "dir"}
    _populate(rng, upper, "upper", rng.randint(4, 14), upper_markers, below_dirs)
    for d in lowers + [upper]:
        os.utime(d, ns=(GENERATED_TIME_BASE * 10**9,) * 2)
    return Stack(root=root, lowers=lowers, upper=upper, work=work, mnt=mnt,
                 upper_oci_markers=upper_markers)


def _set_opaque(path):
    os.setxattr(path, KERNEL_OPAQUE_XATTR, b"y", follow_symlinks=False)


def convert_oci_to_kernel(layer):
    """Rewrite OCI markers in `layer` into kernel form, keeping dir times.

    `.wh.NAME` -> char 0/0 at NAME; if NAME exists in the same layer the
    whiteout only hides lower layers: a dir NAME becomes opaque, for a non-dir
    NAME the whiteout is redundant and dropped. `.wh..wh..opq` -> opaque xattr.
    Returns the relpaths of the markers converted.
    """
    layer = Path(layer)
    converted = []
    for dirpath, dirnames, filenames in os.walk(layer):
        dirnames.sort()
        names = sorted(filenames + dirnames)
        markers = [n for n in names if n.startswith(OCI_PREFIX)]
        if not markers:
            continue
        d = Path(dirpath)
        st = os.lstat(d)
        for marker in markers:
            marker_path = d / marker
            if not stat.S_ISREG(os.lstat(marker_path).st_mode):
                continue
            converted.append(os.path.relpath(marker_path, layer))
            os.unlink(marker_path)
            if marker == OCI_OPAQUE:
                _set_opaque(d)
                continue
            target = d / marker[len(OCI_PREFIX):]
            if os.path.lexists(target):
                if stat.S_ISDIR(os.lstat(target).st_mode):
                    tst = os.lstat(target)
                    _set_opaque(target)
                    os.utime(target, ns=(tst.st_atime_ns, tst.st_mtime_ns))
            else:
                os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    return converted


def list_oci_markers(layer):
    """Relpaths of every OCI marker file in a layer."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(layer):
        for n in filenames + dirnames:
            if n.startswith(OCI_PREFIX):
                found.add(os.path.relpath(os.path.join(dirpath, n), layer))
    return found


OPEN_MATRIX_KINDS = ["lowerfile", "upperfile", "missing", "symlower", "chain", "dangling", "dir"]


def _open_flag_combos():
    combos = []
    for acc in ("RDONLY", "WRONLY", "RDWR"):
        for bits in range(16):
            names = [acc] + [n for i, n in enumerate(("APPEND", "TRUNC", "CREAT", "EXCL"))
                             if bits & (1 << i)]
            combos.append("|".join(names))
    return combos


def open_matrix_cases():
    """(op tuples) open of every kind of name with each of the 48 flag combinations."""
    cases = []
    for k, flags in enumerate(_open_flag_combos()):
        for kind in OPEN_MATRIX_KINDS:
            cases.append(("open", f"{kind}{k}", flags, 3, k % 256))
    return cases


def generate_open_matrix_stack(seed, root):
    """A fixed two-lower stack with one fresh name of each kind per flag combination:
    lower file, upper file, missing name, symlink to a lower file, a chain of two
    symlinks to a lower file, a dangling symlink (to a creatable name), a dir."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lowers = [root / "lower1", root / "lower2"]
    upper, work, mnt = root / "upper", root / "work", root / "mnt"
    for d in lowers + [upper, work, mnt]:
        d.mkdir()
    top, bottom = lowers
    ns = GENERATED_TIME_BASE * 10**9
    for k in range(len(_open_flag_combos())):
        (bottom / f"lowerfile{k}").write_bytes(b"lower data %d\n" % k)
        (bottom / f"target{k}").write_bytes(b"target %d\n" % k)
        (upper / f"upperfile{k}").write_bytes(b"upper data %d\n" % k)
        os.symlink(f"target{k}", top / f"symlower{k}")
        os.symlink(f"hop{k}", top / f"chain{k}")
        os.symlink(f"target{k}", bottom / f"hop{k}")
        os.symlink(f"nothing{k}", top / f"dangling{k}")
        os.mkdir(bottom / f"dir{k}")
        os.mkdir(top / f"dir{k}")  # a merged dir
    for layer in lowers + [upper]:
        for name in os.listdir(layer):
            os.utime(layer / name, ns=(ns, ns), follow_symlinks=False)
        os.utime(layer, ns=(ns, ns))
    return Stack(root=root, lowers=lowers, upper=upper, work=work, mnt=mnt)
