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
