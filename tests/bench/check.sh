#!/bin/bash
# img check against qemu-img check on a 4 GiB fully allocated image with
# internal snapshots, measured in the same run; then the bitmap extent read
# of a 1 TiB bitmap (go test -bench). Prints tables; asserts nothing.
#   tests/bench/check.sh            (RUNS=10 SIZE_G=4 by default)
#   SIZE_G=5 RUNS=15 BEFORE_BIN=/path/to/older/qcow2-csi tests/bench/check.sh
# The tools alternate run by run; min and median are printed because the
# machine is shared and single runs are noisy. The ratio row is each
# qcow2-csi median over qemu-img's (issue 21's target: at most 1.0x).
# BEFORE_BIN adds a column for a prebuilt binary (an earlier commit's), so
# that a change is measured against its predecessor in the same run.
# qcow2-csi is built as `make build` builds it (static, CGO_ENABLED=0):
# process start-up is part of the figure.
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
CGO_ENABLED=0 go build -trimpath -o "$bin" ./cmd/qcow2-csi
tools=(qemu-img qcow2-csi)
declare -A cmd=([qemu-img]="qemu-img" [qcow2-csi]="$bin img")
if [ -n "${BEFORE_BIN:-}" ]; then
  tools+=(before)
  cmd[before]="$BEFORE_BIN img"
fi

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

run() { # run CMD... -> elapsed ms, fails if the check is not clean
  # EPOCHREALTIME (microseconds) costs no process, unlike date.
  local t0 t1
  t0=${EPOCHREALTIME/./}
  "$@" >/dev/null
  t1=${EPOCHREALTIME/./}
  awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f\n", d / 1e3 }'
}
declare -A times=()
for ((i = 1; i <= RUNS; i++)); do
  for t in "${tools[@]}"; do
    # shellcheck disable=SC2086 # cmd holds a program and its first word
    times[$t]+="$(run ${cmd[$t]} check "$img") "
  done
done
stat() { # min median of the arguments
  sort -n <(printf '%s\n' "$@") | awk '{v[NR]=$1} END {printf "%.1f %.1f\n", v[1], v[int((NR+1)/2)]}'
}
row() { # row LABEL VALUE...
  printf '%-28s' "$1"
  shift
  printf ' %10s' "$@"
  echo
}
mins=() meds=() ratios=()
for t in "${tools[@]}"; do
  # shellcheck disable=SC2086 # one word per run
  read -r lo med < <(stat ${times[$t]})
  mins+=("$lo")
  meds+=("$med")
  ratios+=("$(awk -v o="$med" -v q="${meds[0]}" 'BEGIN { if (q > 0) printf "%.2fx", o/q; else print "-" }')")
done
echo
row "check, $RUNS runs (ms)" "${tools[@]}"
row min "${mins[@]}"
row median "${meds[@]}"
row "median / qemu-img" "${ratios[@]}"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for t in "${tools[@]}"; do echo "all runs, $t: ${times[$t]}"; done
printf '%-28s %10s\n' "json output identical?" \
  "$(diff <(qemu-img check --output=json "$img") <("$bin" img check --output=json "$img") >/dev/null && echo yes || echo NO)"

printf '%-28s %10s\n' "process start (version)" "$(stat $(for ((i = 0; i < RUNS; i++)); do run "$bin" version; done) | cut -d' ' -f1)"
echo
echo "in-process Open+Check of the same image (go test -bench, no process start):"
QCOW2_CSI_BENCH_IMAGE="$img" go test ./pkg/qcow2 -run '^$' -bench 'CheckImage' -benchtime "${RUNS}x" | grep -E 'Benchmark'

echo
echo "bitmap extents over 1 TiB (go test -bench):"
go test ./pkg/qcow2 -run '^$' -bench 'BitmapExtents1TiB' -benchtime 20x | grep -E 'Benchmark|ok'
