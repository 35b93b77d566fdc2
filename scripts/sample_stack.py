"""Build the demo's small sample stack under a directory (used by scripts/demo.sh).

lower1 (top) hides lower2's /old.txt with an OCI whiteout (.wh.old.txt) and
makes /cache opaque with .wh..wh..opq; lower1-kernel is the same layer with
kernel-form markers, for the kernel's overlayfs, which reads only that form.
"""
import os
import stat
import sys


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def main(root):
    low2 = os.path.join(root, "lower2")
    write(f"{low2}/etc/motd", "welcome to the bottom layer\n")
    write(f"{low2}/etc/hostname", "sample\n")
    write(f"{low2}/old.txt", "deleted by lower1\n")
    write(f"{low2}/cache/stale", "hidden by an opaque dir\n")
    write(f"{low2}/bin/tool", "#!/bin/sh\necho tool\n", 0o755)
    for name, kernel in (("lower1", False), ("lower1-kernel", True)):
        low1 = os.path.join(root, name)
        write(f"{low1}/etc/os-release", "NAME=sample\n")
        write(f"{low1}/cache/fresh", "only this\n")
        write(f"{low1}/readme.txt", "from the top layer\n")
        if kernel:
            os.mknod(f"{low1}/old.txt", stat.S_IFCHR, os.makedev(0, 0))
            os.setxattr(f"{low1}/cache", "trusted.overlay.opaque", b"y")
        else:
            write(f"{low1}/.wh.old.txt", "")
            write(f"{low1}/cache/.wh..wh..opq", "")
    for d in ("upper", "work", "merged"):
        os.makedirs(os.path.join(root, d), exist_ok=True)


if __name__ == "__main__":
    main(sys.argv[1])
