#!/usr/bin/env bash
# Run amir73il/unionmount-testsuite test by test (the suite stops at its first
# failure) against unionfs, the kernel's overlayfs and/or fuse-overlayfs, in
# the modes `--ov` and `--ov=3` (upper layers rotated into lowers), and print
# PASS/FAIL per test plus counts per target and mode.
#
# usage: scripts/unionmount-testsuite.sh [options] SUITE_DIR [TEST...]
#   SUITE_DIR     a checkout of https://github.com/amir73il/unionmount-testsuite
#   -t TARGETS    comma list of unionfs,kernel,fuse-overlayfs (default: unionfs,kernel)
#   -m MODES      comma list of ov,ov3 (default: ov,ov3)
#   -x            leave out --xdev (run the directory-rename tests instead of rename-exdev)
#   -l LOGDIR     keep one log per test here (default: a fresh temp dir, printed)
#   -T SECONDS    per-test time limit (default 300)
#   -o OPTS       extra mount options (UNIONMOUNT_MNTOPTIONS), e.g. metacopy=on
# Exit status: 0 if every test passed, 1 otherwise, 2 on usage errors.
#
# Layers live on two private tmpfs mounts (lower, and base for uppers and the
# union), like the suite's own default, under a 0755 temp dir: the suite
# drops privileges in some tests and needs its dirs world-readable.
set -uo pipefail

targets=unionfs,kernel
modes=ov,ov3
xdev=1
logdir=
limit=300
mntopts=
usage() { sed -n '7,15p' "$0" >&2; exit 2; }
while getopts "t:m:xl:T:o:h" opt; do
  case $opt in
    t) targets=$OPTARG ;;
    m) modes=$OPTARG ;;
    x) xdev=0 ;;
    l) logdir=$OPTARG ;;
    T) limit=$OPTARG ;;
    o) mntopts=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || usage
suite=$(cd "$1" 2>/dev/null && pwd) || { echo "unionmount-testsuite.sh: no such dir: $1" >&2; exit 2; }
shift
[ -x "$suite/run" ] && [ -d "$suite/tests" ] || {
  echo "unionmount-testsuite.sh: $suite is not a unionmount-testsuite checkout" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "unionmount-testsuite.sh: needs root" >&2; exit 2; }
for t in ${targets//,/ }; do
  case $t in
    unionfs) command -v fuse-unionfs >/dev/null || { echo "fuse-unionfs not on PATH (run scripts/setup.sh)" >&2; exit 2; } ;;
    fuse-overlayfs) command -v fuse-overlayfs >/dev/null || { echo "fuse-overlayfs not installed" >&2; exit 2; } ;;
    kernel) ;;
    *) echo "unionmount-testsuite.sh: unknown target $t" >&2; exit 2 ;;
  esac
done
for m in ${modes//,/ }; do
  case $m in ov|ov3) ;; *) echo "unionmount-testsuite.sh: unknown mode $m" >&2; exit 2 ;; esac
done

# The test list, in the suite's own order, read from its `run` script: the
# common list, then rename-exdev under --xdev or the four dir-rename tests.
if [ $# -gt 0 ]; then
  tests=("$@")
else
  mapfile -t tests < <(python3 - "$suite/run" "$xdev" <<'EOF'
import re, sys
src = open(sys.argv[1]).read()
common = re.search(r"^tests = \[(.*?)\]", src, re.S | re.M).group(1)
extra = re.findall(r"tests \+= \[(.*?)\]", src, re.S)
names = re.findall(r'"([^"]+)"', common)
names += re.findall(r'"([^"]+)"', extra[0] if sys.argv[2] == "1" else extra[1])
print("\n".join(names))
EOF
  )
fi

work=$(mktemp -d /tmp/unionmount-testsuite.XXXXXX)
chmod 0755 "$work"
[ -n "$logdir" ] || logdir=$work/logs
mkdir -p "$logdir"
base=$work/base lower=$work/lower mnt=$work/base/m

cleanup() {
  (cd "$suite" && UNIONMOUNT_BASEDIR=$base UNIONMOUNT_LOWERDIR=$lower UNIONMOUNT_MNTPOINT=$mnt \
    timeout 60 python3 ./run -c >/dev/null 2>&1)
  for m in $(awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
  for d in "$base" "$lower"; do
    mountpoint -q "$d" && { umount "$d" 2>/dev/null || umount -l "$d"; }
  done
  rm -rf "$base" "$lower"
}
trap cleanup EXIT

fresh_layers() {
  cleanup
  mkdir -p "$base" "$lower"
  mount -t tmpfs -o mode=0755 umts_base "$base"
  mount -t tmpfs -o mode=0755 umts_lower "$lower"
  mkdir -p "$mnt"
}

declare -A passed failed
failures=()
for target in ${targets//,/ }; do
  for mode in ${modes//,/ }; do
    args=(--ov)
    [ "$mode" = ov3 ] && args=(--ov=3)
    case $target in
      unionfs) args+=(--fuse=fuse-unionfs) ;;
      fuse-overlayfs) args+=(--fuse=fuse-overlayfs) ;;
    esac
    [ "$xdev" = 1 ] && args+=(--xdev)
    key="$target $mode"
    passed[$key]=0 failed[$key]=0
    echo "=== $target: ./run ${args[*]} TEST"
    for test in "${tests[@]}"; do
      fresh_layers
      log=$logdir/$target-$mode-$test.log
      start=$(date +%s%N)
      (cd "$suite" && env UNIONMOUNT_BASEDIR="$base" UNIONMOUNT_LOWERDIR="$lower" \
        UNIONMOUNT_MNTPOINT="$mnt" ${mntopts:+"UNIONMOUNT_MNTOPTIONS=$mntopts"} \
        timeout -k 10 "$limit" python3 ./run "${args[@]}" "$test") >"$log" 2>&1
      rc=$?
      tenths=$(( ($(date +%s%N) - start) / 100000000 ))
      secs=$((tenths / 10)).$((tenths % 10))
      if [ $rc = 0 ]; then
        passed[$key]=$((passed[$key] + 1))
        printf 'PASS  %-15s %-4s %-24s %6ss\n' "$target" "$mode" "$test" "$secs"
      else
        failed[$key]=$((failed[$key] + 1))
        [ $rc = 124 ] && echo "*** timed out after ${limit}s" >>"$log"
        printf 'FAIL  %-15s %-4s %-24s %6ss  (rc %s, log %s)\n' "$target" "$mode" "$test" "$secs" "$rc" "$log"
        grep -v '^\s*$' "$log" | tail -n 4 | sed 's/^/        | /'
        failures+=("$target $mode $test")
      fi
    done
  done
done

echo
echo "=== summary (${#tests[@]} tests per run; logs in $logdir)"
status=0
for target in ${targets//,/ }; do
  for mode in ${modes//,/ }; do
    key="$target $mode"
    printf '%-15s %-4s passed %3d  failed %3d\n' "$target" "$mode" "${passed[$key]}" "${failed[$key]}"
    [ "${failed[$key]}" = 0 ] || status=1
  done
done
for f in "${failures[@]}"; do echo "failed: $f"; done
exit $status
