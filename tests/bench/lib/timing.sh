# Timing helpers shared by the tests/bench scripts (source it; not a bench).

now_ns() { date +%s%N; }

# time_ms OUT CMD...: wall time of CMD plus `sync OUT`, in ms.
time_ms() {
  local out=$1 t0 t1
  shift
  t0=$(now_ns)
  "$@" >/dev/null
  sync "$out"
  t1=$(now_ns)
  awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f\n", (b-a)/1e6}'
}

# min_p50: numbers on stdin, one per line, printed as "min/median".
min_p50() { sort -n | awk '{a[NR]=$1} END {if (NR%2) m=a[(NR+1)/2]; else m=(a[NR/2]+a[NR/2+1])/2; printf "%s/%.0f\n", a[1], m}'; }

# luks_retry CMD...: runs a qemu command that creates a LUKS key slot, again
# (up to 8 tries) only when it failed on QEMU's PBKDF2 calibration ("Unable
# to get accurate CPU usage": its first trial measured 0 ms of thread CPU
# time, which happens here on about 1 create in 5; tests/peer does the same).
luks_retry() {
  local err try
  for try in 1 2 3 4 5 6 7 8; do
    if err=$("$@" 2>&1); then return 0; fi
    case $err in *"Unable to get accurate CPU usage"*) echo "luks_retry: try $try: $err" >&2 ;; *) echo "$err" >&2; return 1 ;; esac
  done
  return 1
}
