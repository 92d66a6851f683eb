# e2e_bench runs one opt-in benchmark scenario of the e2e suite on a fresh e2e
# cluster and prints the table the scenario logs after its marker line
# (source it; not a bench). The previous-chart upgrade (scenario 0) is not
# what is measured: it is skipped unless QCOW2_CSI_E2E_PREV_REF says otherwise.
#
# Usage: e2e_bench SCRIPT SCENARIO MARKER [VAR=value ...]
#   SCRIPT names the caller in messages, SCENARIO is the scenario's number,
#   MARKER the log line the table follows, VAR=value the scenario's settings.
e2e_bench() {
  local script=$1 scenario=$2 marker=$3
  shift 3
  [ "$(id -u)" = 0 ] || { echo "$script: the e2e cluster needs root" >&2; exit 1; }
  e2e_bench_log=$(mktemp)
  trap 'rm -f "$e2e_bench_log"' EXIT
  if ! env QCOW2_CSI_E2E_PREV_REF="${QCOW2_CSI_E2E_PREV_REF:-none}" "$@" \
    go test -count=1 -timeout 40m -v -run "TestE2E/^(examples-validate|0-|$scenario-)" ./tests/e2e/ > "$e2e_bench_log" 2>&1; then
    tail -60 "$e2e_bench_log" >&2
    echo "$script: the e2e run failed (log above)" >&2
    exit 1
  fi
  # The table is the log's lines after the marker, indented by t.Logf.
  awk -v m="$marker" '$0 ~ m"$" {on=1; next} on && /^        / {sub(/^        /, ""); print; next} on {exit}' "$e2e_bench_log"
}
