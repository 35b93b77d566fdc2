"""One scenario inside a user namespace (run by test_userns_format.py as
`unshare -Urm PYTHON userns_scenario.py BASE WRITER`): the same changes made
through one filesystem (WRITER: "unionfs" or "kernel", the kernel's overlayfs
mounted with userxattr), then the upper read back by both. Prints one line of
JSON: the tree each mount shows, and the markers found in the upper.

Not a test module: it runs where a test cannot (as root of a new user
namespace, where trusted.* xattrs are refused and char 0/0 devices are not).
"""
import hashlib
import json
import os
import stat
import subprocess
import sys

VENV_BIN = os.path.dirname(sys.executable)

CHANGES = """
set -e
rm f1
rm -r d1
mkdir newdir && echo n > newdir/n
rm -r d3 && mkdir d3 && echo fresh > d3/fresh
mv f2 f2moved
echo more >> f3
mkdir d4/sub2 && echo s > d4/sub2/s
rm d4/x
ln -s f3 newlink
rm link1
rm f5 && mkdir f5
touch f1
rm -r d6 && echo file > d6
mv d4/y d4/sub2/y
"""


def build_lowers(base: str) -> list:
    l1, l2 = os.path.join(base, "l1"), os.path.join(base, "l2")
    tree = {
        l2: {"f1": "one", "f2": "two", "d1/a": "a", "d1/b/c": "c", "d3/old": "old",
             "d4/x": "x", "d6/in": "in"},
        l1: {"f3": "three", "f5": "five", "d3/old2": "old2", "d4/y": "y"},
    }
    for root, files in tree.items():
        for rel, text in files.items():
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    os.symlink("f3", os.path.join(l1, "link1"))
    return [l1, l2]


def snapshot(root: str) -> dict:
    """Every object under root: type, permission bits, and content/target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)]
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry.append(hashlib.sha1(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(path))
            found[rel] = entry
    return found


def markers(upper: str) -> dict:
    """The upper's markers: whiteouts (by form) and opaque directories."""
    seen = {"device_whiteouts": [], "oci_names": [], "opaque_user": [], "xattr_whiteouts": []}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, upper)
            st = os.lstat(path)
            if name.startswith(".wh."):
                seen["oci_names"].append(rel)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                seen["device_whiteouts"].append(rel)
            if stat.S_ISDIR(st.st_mode):
                try:
                    if os.getxattr(path, "user.overlay.opaque") == b"y":
                        seen["opaque_user"].append(rel)
                except OSError:
                    pass
            if stat.S_ISREG(st.st_mode):
                try:
                    os.getxattr(path, "user.overlay.whiteout")
                    seen["xattr_whiteouts"].append(rel)
                except OSError:
                    pass
    return {k: sorted(v) for k, v in seen.items()}


def run(*argv):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


class Mounts:
    def __init__(self, base, lowers):
        self.lowers, self.base = lowers, base
        self.upper, self.work, self.mnt = (os.path.join(base, n) for n in ("upper", "work", "mnt"))
        for d in (self.upper, self.work, self.mnt):
            os.mkdir(d)

    def unionfs(self):
        opts = f"lowerdir={':'.join(self.lowers)},upperdir={self.upper},workdir={self.work}"
        run(os.path.join(VENV_BIN, "fuse-unionfs"), "-o", opts, self.mnt)
        return os.path.join(VENV_BIN, "unionfs"), "umount", self.mnt

    def kernel(self):
        opts = (f"userxattr,lowerdir={':'.join(self.lowers)},upperdir={self.upper},"
                f"workdir={self.work}")
        run("mount", "-t", "overlay", "overlay", "-o", opts, self.mnt)
        return "umount", self.mnt

    def view(self, which):
        """The tree `which` shows of the layers as they are now."""
        unmount = getattr(self, which)()
        try:
            return snapshot(self.mnt)
        finally:
            run(*unmount)

    def change(self, which):
        unmount = getattr(self, which)()
        try:
            run("sh", "-c", f"cd {self.mnt} && {CHANGES}")
            return snapshot(self.mnt)
        finally:
            run(*unmount)


def main():
    base, writer = sys.argv[1], sys.argv[2]
    reader = {"unionfs": "kernel", "kernel": "unionfs"}[writer]
    m = Mounts(base, build_lowers(base))
    with open("/proc/self/uid_map") as f:
        uid_map = f.read().split()
    written = m.change(writer)
    result = {"uid_map": uid_map, "writer": written, "markers": markers(m.upper),
              "reader": m.view(reader), "writer_again": m.view(writer)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
