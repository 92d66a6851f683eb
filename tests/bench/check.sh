#!/bin/bash
# img check against qemu-img check on a 4 GiB fully allocated image with
# internal snapshots, measured in the same run; then the bitmap extent read
# of a 1 TiB bitmap (go test -bench). Prints tables; asserts nothing.
#   tests/bench/check.sh            (RUNS=10 SIZE_G=4 by default)
# The two tools alternate run by run; min and median are printed because
# the machine is shared and single runs are noisy.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
RUNS=${RUNS:-10}
SIZE_G=${SIZE_G:-4}
for p in qemu-img qemu-io; do
  command -v $p >/dev/null || { echo "check.sh: $p missing (run hack/deps.sh)" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/qcow2-csi-check-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
bin="$work/qcow2-csi"
go build -o "$bin" ./cmd/qcow2-csi

img="$work/big.qcow2"
qemu-img create -q -f qcow2 "$img" "${SIZE_G}G"
# Fill every cluster, snapshot, rewrite a quarter (copy-on-write), snapshot.
for ((g = 0; g < SIZE_G; g++)); do
  qemu-io -c "write -P $((g + 1)) ${g}G 1G" "$img" >/dev/null
done
qemu-img snapshot -c s1 "$img"
qemu-io -c "write -P 0x55 0 $((SIZE_G * 256))M" "$img" >/dev/null
qemu-img snapshot -c s2 "$img"
qemu-img bitmap --add "$img" cbt
echo "image: ${SIZE_G} GiB virtual, $(du -h --apparent-size "$img" | cut -f1) file, 2 snapshots, 1 bitmap"

# now_ns prints a monotonic-enough wall clock in nanoseconds.
now_ns() { date +%s%N; }
run() { # run CMD... -> elapsed ms, fails if the check is not clean
  local t0 t1
  t0=$(now_ns)
  "$@" >/dev/null
  t1=$(now_ns)
  echo $(((t1 - t0) / 1000000))
}
qs=() os=()
for ((i = 1; i <= RUNS; i++)); do
  qs+=("$(run qemu-img check "$img")")
  os+=("$(run "$bin" img check "$img")")
done
stat() { # min median of the arguments
  sort -n <(printf '%s\n' "$@") | awk '{v[NR]=$1} END {printf "%d %d\n", v[1], v[int((NR+1)/2)]}'
}
read -r qmin qmed < <(stat "${qs[@]}")
read -r omin omed < <(stat "${os[@]}")
printf '\n%-28s %10s %10s\n' "check, $RUNS runs (ms)" "qemu-img" "qcow2-csi"
printf '%-28s %10s %10s\n' "min" "$qmin" "$omin"
printf '%-28s %10s %10s\n' "median" "$qmed" "$omed"
printf '%-28s %10s %10s\n' "all runs" "${qs[*]}" ""
printf '%-28s %10s %10s\n' "" "" "${os[*]}"
printf '%-28s %10s %10s\n' "json output identical?" "" \
  "$(diff <(qemu-img check --output=json "$img") <("$bin" img check --output=json "$img") >/dev/null && echo yes || echo NO)"

printf '%-28s %10s %10s\n' "process start (version)" "" "$(stat $(for ((i = 0; i < RUNS; i++)); do run "$bin" version; done) | cut -d' ' -f1)"
echo
echo "in-process Open+Check of the same image (go test -bench, no process start):"
QCOW2_CSI_BENCH_IMAGE="$img" go test ./pkg/qcow2 -run '^$' -bench 'CheckImage' -benchtime "${RUNS}x" | grep -E 'Benchmark'

echo
echo "bitmap extents over 1 TiB (go test -bench):"
go test ./pkg/qcow2 -run '^$' -bench 'BitmapExtents1TiB' -benchtime 20x | grep -E 'Benchmark|ok'
