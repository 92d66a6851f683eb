#!/usr/bin/env bash
# Kernel NBD benchmark, in a VM (the host kernel has no nbd): fio on
# /dev/nbdN attached by the node plugin's in-process server (1, 2 and 4
# connections), on /dev/nbd15 attached by `qemu-nbd -c` serving the same
# kind of qcow2 image, and on a buffered loop device on a raw file (the
# floor), all in one guest, one run. See tests/vm/bench_test.go for the
# setup. The guest runs under TCG, which slows every figure: compare the
# ratio columns only.
#
# Rows: 4k random and 1M sequential, read and write, QD1 (psync) and QD32
# (libaio), O_DIRECT on the device. Each row runs the devices alternately
# REPEAT times (RUNTIME seconds a run) and keeps each one's best run.
#
# Usage: tests/bench/vmnbd.sh
#        SIZE=256M RUNTIME=3 REPEAT=2 CONNS=1,2,4 tests/bench/vmnbd.sh
# It takes the VM lock (/work/logs/vm.lock when it exists): one VM at a time.
set -euo pipefail
cd "$(dirname "$0")/../.."

export QCOW2_CSI_VM_BENCH=1
export QCOW2_CSI_BENCH_SIZE=${SIZE:-256M}
export QCOW2_CSI_BENCH_RUNTIME=${RUNTIME:-3}
export QCOW2_CSI_BENCH_REPEAT=${REPEAT:-2}
export QCOW2_CSI_BENCH_CONNS=${CONNS:-1,2,4}
lock=${VM_LOCK:-/work/logs/vm.lock}
cmd=(go test -count=1 -timeout 45m -v -run '^TestVMBenchNBD$' ./tests/vm/)
if [ -d "$(dirname "$lock")" ]; then cmd=(flock "$lock" "${cmd[@]}"); fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export QCOW2_CSI_VM_BENCH_OUT=$work/table
"${cmd[@]}" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
cat "$work/table"
