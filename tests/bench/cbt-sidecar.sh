#!/usr/bin/env bash
# Changed block tracking through Kubernetes (issue 14): wall time of the
# upstream snapshot-metadata-lister for the delta and the allocated list of a
# 10 GiB block volume with 1 GiB changed between two snapshots (1024 runs of
# 1 MiB), through the chart's csi-snapshot-metadata sidecar, next to the same
# GetMetadataDelta/GetMetadataAllocated streams read from the controller's
# CSI socket directly, in the same run on the same volume.
#
# It is e2e scenario 19 (tests/e2e/cbt_test.go), opt-in: this script brings
# up the e2e cluster (root; see tests/e2e/doc.go for what it needs), runs
# the scenario with QCOW2_CSI_E2E_CBT_BENCH=1 and prints its table. Only one
# e2e cluster may run on a machine at a time: on a shared machine wrap it in
# the e2e lock (flock /work/logs/e2e.lock tests/bench/cbt-sidecar.sh).
#
# Usage: tests/bench/cbt-sidecar.sh          REPS=5 tests/bench/cbt-sidecar.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib/e2ebench.sh
e2e_bench cbt-sidecar.sh 19 CBT-BENCH QCOW2_CSI_E2E_CBT_BENCH=1 REPS="${REPS:-3}"
