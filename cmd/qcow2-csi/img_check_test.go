package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// capture runs an img sub-command in-process and returns its exit code and
// what it printed on stdout and stderr.
func capture(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	oldOut, oldErr := os.Stdout, os.Stderr
	ro, wo, _ := os.Pipe()
	re, we, _ := os.Pipe()
	os.Stdout, os.Stderr = wo, we
	var out, errb bytes.Buffer
	done := make(chan struct{})
	go func() { io.Copy(&out, ro); done <- struct{}{} }()
	go func() { io.Copy(&errb, re); done <- struct{}{} }()
	code := runImg(args)
	wo.Close()
	we.Close()
	<-done
	<-done
	os.Stdout, os.Stderr = oldOut, oldErr
	return code, out.String(), errb.String()
}

func qemuImg(t *testing.T, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(peer.Require(t, "qemu-img"), args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), out.String()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, out.String()
}

func mustQemu(t *testing.T, tool string, args ...string) {
	t.Helper()
	if out, errb, err := peer.Run(context.Background(), t, tool, args...); err != nil {
		t.Fatalf("%s %v: %v\n%s%s", tool, args, err, out, errb)
	}
}

// img check prints what qemu-img check prints (JSON byte for byte, human
// summary line for line) and exits with its code, on a clean image and on
// one with a leaked cluster; -r leaks repairs it as qemu-img does.
func TestImgCheckMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
	mustQemu(t, "qemu-io", "-c", "write 0 256k", "-c", "write -c 1M 64k", "-c", "write 32M 64k", p)
	mustQemu(t, "qemu-img", "snapshot", "-c", "s", p)
	mustQemu(t, "qemu-io", "-c", "write 0 64k", p)
	leaky := filepath.Join(dir, "leak.qcow2")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	// Leak: drop the active L2 entry of guest cluster 1 (its cluster is
	// shared with the snapshot, so only the refcount is now one too high).
	l1 := binary.BigEndian.Uint64(data[40:])
	l2 := binary.BigEndian.Uint64(data[l1:]) & 0x00fffffffffffe00
	binary.BigEndian.PutUint64(data[l2+8:], 0)
	if err := os.WriteFile(leaky, data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		file string
		args []string
		code int
	}{
		{"clean-json", p, []string{"--output=json"}, 0},
		{"clean-human", p, nil, 0},
		{"leak-json", leaky, []string{"--output", "json"}, 3},
		{"leak-human", leaky, nil, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			qcode, qout := qemuImg(t, append(append([]string{"check"}, tc.args...), tc.file)...)
			code, out, _ := capture(t, append(append([]string{"check"}, tc.args...), tc.file)...)
			if code != tc.code || qcode != tc.code {
				t.Fatalf("exit %d, qemu-img %d, want %d", code, qcode, tc.code)
			}
			if out != qout {
				t.Fatalf("output differs:\nours:\n%s\nqemu-img:\n%s", out, qout)
			}
		})
	}
	code, out, _ := capture(t, "check", "-r", "leaks", leaky)
	if code != 0 || !strings.Contains(out, "    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.") {
		t.Fatalf("repair: exit %d\n%s", code, out)
	}
	if qcode, qout := qemuImg(t, "check", leaky); qcode != 0 {
		t.Fatalf("qemu-img check after our repair: %d\n%s", qcode, qout)
	}
	for _, bad := range [][]string{{"check"}, {"check", "-r", "some", p}, {"check", "--output=xml", p}, {"check", "-f", "raw", p}, {"check", filepath.Join(dir, "nope")}} {
		if code, _, _ := capture(t, bad...); code != 1 {
			t.Errorf("%v: exit %d, want 1", bad, code)
		}
	}
}

// img bitmap drives the bitmap API with qemu-img's flags; qemu-img info
// sees the result.
func TestImgBitmapMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	ours, theirs := filepath.Join(dir, "o.qcow2"), filepath.Join(dir, "q.qcow2")
	for _, p := range []string{ours, theirs} {
		mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
	}
	steps := [][]string{
		{"--add", "-g", "128k"}, {"--add", "--disable"}, {"--clear"}, {"--enable"}, {"--disable"},
	}
	names := []string{"a", "b", "a", "b", "a"}
	for i, s := range steps {
		args := append(append([]string{"bitmap"}, s...), ours, names[i])
		if code, _, stderr := capture(t, args...); code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, stderr)
		}
		mustQemu(t, "qemu-img", append(append([]string{"bitmap"}, s...), theirs, names[i])...)
	}
	mustQemu(t, "qemu-io", "-c", "write 0 1", ours)
	mustQemu(t, "qemu-io", "-c", "write 0 1", theirs)
	if code, _, e := capture(t, "bitmap", "--merge", "b", "-b", theirs, ours, "a"); code != 0 {
		t.Fatalf("merge -b: %s", e)
	}
	mustQemu(t, "qemu-img", "bitmap", "--merge", "b", theirs, "a")
	infoBitmaps := func(p string) string {
		_, out := qemuImg(t, "info", p)
		return out[strings.Index(out, "bitmaps:"):]
	}
	if a, b := infoBitmaps(ours), infoBitmaps(theirs); a != b {
		t.Fatalf("qemu-img info bitmaps differ:\nours:\n%s\nqemu-img's:\n%s", a, b)
	}
	if code, _, _ := capture(t, "check", ours); code != 0 {
		t.Fatalf("img check after bitmap ops: %d", code)
	}
	for _, bad := range [][]string{
		{"bitmap", ours, "a"},                          // no operation
		{"bitmap", "--remove", "-g", "64k", ours, "a"}, // -g without --add
		{"bitmap", "--clear", "-b", theirs, ours, "a"}, // -b without --merge
		{"bitmap", "--add", ours, "a"},                 // exists
		{"bitmap", "--remove", ours, "zz"},             // missing
		{"bitmap", "--add", "-g", "100", ours, "c"},    // granularity
		{"bitmap", "--add", ours},                      // no name
	} {
		if code, _, _ := capture(t, bad...); code != 1 {
			t.Errorf("%v: exit %d, want 1", bad, code)
		}
	}
}

// img check in every -r mode on an image whose refcount table entry has
// bit 63 set exits as qemu-img check does on the same file (it used to
// panic with an index out of range in the reference walk).
func TestImgCheckRefTableBit63EveryMode(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
	mustQemu(t, "qemu-io", "-c", "write 0 1M", p)
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	rt := binary.BigEndian.Uint64(data[48:])
	binary.BigEndian.PutUint64(data[rt:], binary.BigEndian.Uint64(data[rt:])|1<<63)
	for _, mode := range [][]string{nil, {"-r", "leaks"}, {"-r", "all"}} {
		ours, theirs := filepath.Join(t.TempDir(), "o.qcow2"), filepath.Join(t.TempDir(), "q.qcow2")
		for _, f := range []string{ours, theirs} {
			if err := os.WriteFile(f, data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		qcode, _ := qemuImg(t, append(append([]string{"check"}, mode...), theirs)...)
		code, _, stderr := capture(t, append(append([]string{"check"}, mode...), ours)...)
		if code != qcode {
			t.Errorf("check %v: exit %d, qemu-img %d\n%s", mode, code, qcode, stderr)
		}
		if !strings.Contains(stderr, "refcount block 0 is outside image") {
			t.Errorf("check %v: stderr lacks the finding:\n%s", mode, stderr)
		}
	}
}
