package main

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestSnapshotParam(t *testing.T) {
	cases := []struct {
		in, id, name, err string
	}{
		{in: "snap1"},
		{in: "snapshot.id=2", id: "2"},
		{in: "snapshot.name=daily", name: "daily"},
		{in: "snapshot.id=1,snapshot.name=a", id: "1", name: "a"},
		{in: "snapshot.size=1", err: "unknown key"},
		{in: "snapshot.id", err: "key=value"},
		{in: "snapshot.id=", err: "names no snapshot"},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			id, name, err := snapshotParam(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || id != tc.id || name != tc.name {
				t.Fatalf("got %q %q %v", id, name, err)
			}
		})
	}
}

// -l exports an internal snapshot read-only, as qemu-nbd -l: same data, same
// allocation map, and writes refused.
func TestNBDQcow2Snapshot(t *testing.T) {
	img := filepath.Join(t.TempDir(), "s.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
	mustRun(t, "qemu-io", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 8M 64k", img)
	mustRun(t, "qemu-img", "snapshot", "-c", "first", img)
	mustRun(t, "qemu-io", "-c", "write -P 0x63 0 2M", "-c", "discard 8M 64k", "-c", "write -P 0x64 20M 1M", img)
	mustRun(t, "qemu-img", "snapshot", "-c", "second", img)
	mustRun(t, "qemu-io", "-c", "write -P 0x65 4M 1M", img)
	for _, param := range []string{"first", "snapshot.name=second", "snapshot.id=1"} {
		t.Run(param, func(t *testing.T) {
			q := qemuNBD(t, "-l", param, "-f", "qcow2", img)
			s, done := startNBD(t, "-t", "-l", param, "-f", "qcow2", img)
			defer stopNBD(t, done)
			uq, us := "nbd+unix:///?socket="+q, "nbd+unix:///?socket="+s
			for _, args := range [][]string{{"--map"}, {"--size"}, {"--is", "read-only"}} {
				want := mustRun(t, "nbdinfo", append(args, uq)...)
				got := mustRun(t, "nbdinfo", append(args, us)...)
				if got != want {
					t.Errorf("nbdinfo %v:\nours:\n%s\nqemu-nbd:\n%s", args, got, want)
				}
			}
			mustRun(t, "qemu-img", "compare", uq, us)
			out, err := runPeer(t, "qemu-io", "-f", "raw", "-c", "write 0 4k", us)
			if err == nil && !strings.Contains(out, "ermission") && !strings.Contains(out, "read-only") && !strings.Contains(out, "not permitted") {
				t.Fatalf("write to a snapshot export: %s", out)
			}
		})
	}
	o, _ := parseNBDFlags([]string{"-k", filepath.Join(t.TempDir(), "x.sock"), "-l", "nope", img}, nil)
	if err := serveNBD(o); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("missing snapshot: %v", err)
	}
}
