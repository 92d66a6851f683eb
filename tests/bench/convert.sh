#!/usr/bin/env bash
# convert.sh: `qcow2-csi img convert` against `qemu-img convert` on the same
# 2 GiB qcow2 image in the same run, printed as a table (not asserted).
# The source has 1 GiB of random data, 256 MiB of patterned data, a
# compressed region and unallocated space. Each conversion runs REPS times
# (default 3) per tool, alternating, and the best time counts (the machine
# is shared and noisy). CONVERT_BENCH_COMPRESS=1 adds -c (slow: minutes).
# Both tools write the target without fsync (qemu-img convert's default
# cache=unsafe). Needs qemu-img and qemu-io.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
work=$(mktemp -d "${TMPDIR:-/tmp}/convert-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
for p in qemu-img qemu-io; do
	command -v "$p" >/dev/null || { echo "convert.sh: $p missing (run hack/deps.sh)" >&2; exit 1; }
done
bin="$work/qcow2-csi"
(cd "$root" && go build -o "$bin" ./cmd/qcow2-csi)

cd "$work"
qemu-img create -q -f raw src.raw 2G
dd if=/dev/urandom of=src.raw bs=1M count=1024 conv=notrunc status=none
qemu-io -f raw -c 'write -P 0x5a 1280M 256M' src.raw >/dev/null
qemu-img convert -O qcow2 src.raw src.qcow2
qemu-io -c 'write -c -P 0x33 1792M 64M' src.qcow2 >/dev/null
rm -f src.raw
sync

now() { date +%s.%N; }
# time_one OUT CMD...: wall time of one run (OUT removed first).
time_one() {
	local out=$1; shift
	rm -f "$out"
	local t0 t1
	t0=$(now)
	"$@" >/dev/null
	t1=$(now)
	echo "$t1 - $t0" | bc -l
}

printf '%-34s %12s %12s %8s\n' "convert of a 2 GiB qcow2 image" "qemu-img s" "qcow2-csi s" "ratio"
reps=${REPS:-3}
modes=("raw" "qcow2")
[ "${CONVERT_BENCH_COMPRESS:-0}" = 1 ] && modes+=("qcow2 -c")
for mode in "${modes[@]}"; do
	fmt=${mode%% *}
	extra=""; [ "$mode" = "qcow2 -c" ] && extra="-c"
	best_q=999999; best_u=999999
	for rep in $(seq "$reps"); do
		tq=$(time_one dst-q qemu-img convert $extra -O "$fmt" src.qcow2 dst-q)
		tu=$(time_one dst-u "$bin" img convert $extra -O "$fmt" src.qcow2 dst-u)
		best_q=$(echo "if ($tq < $best_q) $tq else $best_q" | bc -l)
		best_u=$(echo "if ($tu < $best_u) $tu else $best_u" | bc -l)
	done
	qemu-img compare -q src.qcow2 dst-u || { echo "convert.sh: our -O $mode output differs from the source" >&2; exit 1; }
	printf '%-34s %12.2f %12.2f %8.2f\n' "-O $mode" "$best_q" "$best_u" "$(echo "$best_u / $best_q" | bc -l)"
	rm -f dst-q dst-u
done
echo "(ratio = qcow2-csi / qemu-img; below 1 means qcow2-csi is faster)"
