#!/usr/bin/env bash
# Sets everything up (idempotent), then shows unionfs on a built-in sample
# stack: two lower layers with whiteouts in both formats, a merged view, a
# copy-up, a delete, and the upper layer that results.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
VENV="${UNIONFS_PREFIX:-/opt/unionfs}/venv"
UNIONFS="$VENV/bin/unionfs"

demo=$(mktemp -d /tmp/unionfs-demo.XXXXXX)
cleanup() {
  mountpoint -q "$demo/merged" && "$UNIONFS" umount "$demo/merged"
  rm -rf "$demo"
}
trap cleanup EXIT
"$VENV/bin/python" "$here/scripts/sample_stack.py" "$demo"

show() { echo; echo "\$ $*"; "$@"; }
echo "== sample stack in $demo: lower1 (top), lower2 (bottom) =="
show ls -la "$demo/lower1" "$demo/lower2"
show "$UNIONFS" mount --lower "$demo/lower1" --lower "$demo/lower2" \
  --upper "$demo/upper" --work "$demo/work" "$demo/merged"
echo "== the merged view: lower1 wins, whiteouts hide, etc/ is merged =="
show ls -la "$demo/merged" "$demo/merged/etc"
show cat "$demo/merged/etc/motd"
echo "== a write copies the file up; the lower layer is untouched =="
show sh -c "echo 'hello from the container' >> '$demo/merged/etc/motd'"
show cat "$demo/merged/etc/motd"
show cat "$demo/lower2/etc/motd"
echo "== a delete of a lower file leaves a whiteout in upper =="
show rm "$demo/merged/etc/hostname"
show ls -la "$demo/merged/etc" "$demo/upper/etc"
show "$UNIONFS" umount "$demo/merged"
echo "== the kernel's overlayfs reads the same upper =="
if mount -t overlay overlay -o "lowerdir=$demo/lower1-kernel:$demo/lower2,upperdir=$demo/upper,workdir=$demo/work" "$demo/merged" 2>/dev/null; then
  show ls -la "$demo/merged/etc"
  umount "$demo/merged"
else
  echo "(kernel overlayfs not available here)"
fi
echo; echo "demo: done"
