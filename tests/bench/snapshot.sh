#!/usr/bin/env bash
# Internal snapshot and resize benchmark: `qcow2-csi img snapshot -c/-d` and
# `qcow2-csi img resize` against `qemu-img snapshot -c/-d` and `qemu-img
# resize`, whole process against whole process, on identical copies of the
# same image, in the same run.
#
# Rows: snapshot create and delete on images with 1 GiB and 8 GiB allocated
# (64 KiB clusters, every cluster allocated), and resize of a 1 TiB image
# (grow to 2 TiB, which relocates the L1 table, and shrink back with
# --shrink). Figures are medians of REPS runs (the shrink runs once), in
# milliseconds. The machine is shared: compare within one run only.
#
# Usage: tests/bench/snapshot.sh
#        REPS=9 SIZES="1G 8G" ROWS="snapshot resize" tests/bench/snapshot.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

REPS=${REPS:-7}
ROWS=${ROWS:-snapshot resize}
SIZES=${SIZES:-1G 8G}
for p in qemu-img qemu-io; do
  command -v "$p" >/dev/null || { echo "snapshot.sh: $p is missing (run hack/deps.sh)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/qcow2-csi" ./cmd/qcow2-csi
BIN=$work/qcow2-csi

now_ns() { date +%s%N; }

# "min/median" of the numbers on stdin: on a shared machine the minimum is
# the steadier figure, the median says how noisy the run was.
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) m=a[(NR+1)/2]; else m=(a[NR/2]+a[NR/2+1])/2; printf "%s/%.1f\n", a[1], m}'; }
# ratio of the minima of two "min/median" figures
ratio() { awk -v a="${1%%/*}" -v b="${2%%/*}" 'BEGIN {printf "%.2f", a/b}'; }

# time_ms CMD...: wall time of one whole process, in ms (fails loudly).
time_ms() {
  local t0 t1
  t0=$(now_ns)
  "$@" >/dev/null
  t1=$(now_ns)
  awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f\n", (b-a)/1e6}'
}

row() { printf "%-34s %16s %16s %8s\n" "$@"; }

echo "snapshot.sh: $(nproc) cores, REPS=$REPS, $(qemu-img --version | head -1)"
row "operation" "qemu-img ms" "qcow2-csi ms" "ratio"
row "" "min/median" "min/median" "of min"

case " $ROWS " in *" snapshot "*) ;; *) SIZES= ;; esac
for size in $SIZES; do
  img=$work/base-$size.qcow2
  # Every cluster allocated (preallocation=falloc: the same L2 entries and
  # refcounts as a fully written image, which is all a snapshot touches,
  # without writing gigabytes on a shared machine).
  qemu-img create -q -f qcow2 -o cluster_size=64k,preallocation=falloc "$img" "$size"
  cp --sparse=always "$img" "$work/q.qcow2"
  cp --sparse=always "$img" "$work/o.qcow2"
  sync
  qc=(); oc=(); qd=(); od=()
  for i in $(seq "$REPS"); do
    qc+=("$(time_ms qemu-img snapshot -c "s$i" "$work/q.qcow2")")
    oc+=("$(time_ms "$BIN" img snapshot -c "s$i" "$work/o.qcow2")")
  done
  for i in $(seq "$REPS"); do
    qd+=("$(time_ms qemu-img snapshot -d "s$i" "$work/q.qcow2")")
    od+=("$(time_ms "$BIN" img snapshot -d "s$i" "$work/o.qcow2")")
  done
  for f in q o; do
    qemu-img check -q "$work/$f.qcow2" || { echo "snapshot.sh: $f.qcow2 does not check clean" >&2; exit 1; }
  done
  qm=$(printf '%s\n' "${qc[@]}" | median); om=$(printf '%s\n' "${oc[@]}" | median)
  row "snapshot -c ($size allocated)" "$qm" "$om" "$(ratio "$om" "$qm")"
  qm=$(printf '%s\n' "${qd[@]}" | median); om=$(printf '%s\n' "${od[@]}" | median)
  row "snapshot -d ($size allocated)" "$qm" "$om" "$(ratio "$om" "$qm")"
  rm -f "$img" "$work/q.qcow2" "$work/o.qcow2"
done

case " $ROWS " in *" resize "*) ;; *) echo "(ratio = qcow2-csi / qemu-img of the minima; below 1 is faster)"; exit 0 ;; esac
# Resize of a 1 TiB image (data at both ends): grow to 2 TiB (the L1 table
# grows and moves), REPS times on fresh copies; then shrink back to 1 TiB
# once (qemu-img discards the dropped range cluster by cluster, which takes
# tens of seconds here).
qemu-img create -q -f qcow2 -o cluster_size=64k "$work/big.qcow2" 1T
qemu-io -f qcow2 -c "write -P 1 0 64M" -c "write -P 2 1023G 64M" "$work/big.qcow2" >/dev/null
qg=(); og=()
for i in $(seq "$REPS"); do
  cp --sparse=always "$work/big.qcow2" "$work/q.qcow2"
  cp --sparse=always "$work/big.qcow2" "$work/o.qcow2"
  qg+=("$(time_ms qemu-img resize "$work/q.qcow2" 2T)")
  og+=("$(time_ms "$BIN" img resize "$work/o.qcow2" 2T)")
done
qm=$(printf '%s\n' "${qg[@]}" | median); om=$(printf '%s\n' "${og[@]}" | median)
row "resize 1T -> 2T" "$qm" "$om" "$(ratio "$om" "$qm")"
qemu-io -f qcow2 -c "write -P 3 1536G 64M" "$work/q.qcow2" >/dev/null
qemu-io -f qcow2 -c "write -P 3 1536G 64M" "$work/o.qcow2" >/dev/null
qm=$(time_ms qemu-img resize --shrink "$work/q.qcow2" 1T)
om=$(time_ms "$BIN" img resize --shrink "$work/o.qcow2" 1T)
row "resize --shrink 2T -> 1T (once)" "$qm" "$om" "$(ratio "$om" "$qm")"
for f in q o; do
  qemu-img check -q "$work/$f.qcow2" || { echo "snapshot.sh: resized $f.qcow2 does not check clean" >&2; exit 1; }
done
qemu-img compare -q "$work/q.qcow2" "$work/o.qcow2" || { echo "snapshot.sh: resized images differ" >&2; exit 1; }
echo "(ratio = qcow2-csi / qemu-img of the minima; below 1 is faster)"
