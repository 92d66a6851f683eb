package main

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// The snapshot, resize and amend faces against qemu-img 7.2: the same
// command lines give the same exit status, and the snapshot listing is
// byte for byte qemu-img's.

// captureStdout runs f with os.Stdout redirected and returns what it
// printed.
func captureStdout(t *testing.T, f func()) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stdout
	os.Stdout = w
	done := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(r)
		done <- b
	}()
	defer func() { os.Stdout = old }()
	f()
	w.Close()
	os.Stdout = old
	return string(<-done)
}

func runQemuImg(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(peer.Require(t, "qemu-img"), args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = io.Discard
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return out.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("qemu-img %v: %v", args, err)
	}
	return out.String(), 0
}

func TestImgSnapshotListLikeQemu(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
	mustQemu(t, "qemu-img", "snapshot", "-c", "made by qemu", p)
	for _, name := range []string{"ours", "ünïcödé", strings.Repeat("long", 80)} {
		if rc := runImgSnapshot([]string{"-c", name, p}); rc != 0 {
			t.Fatalf("snapshot -c %q: exit %d", name, rc)
		}
	}
	// A VM state snapshot, when qemu-system is here, shows VM SIZE/CLOCK.
	if sys, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		cmd := exec.Command(sys, "-M", "none", "-nodefaults", "-display", "none",
			"-drive", "file="+p+",if=none,id=d0,format=qcow2", "-monitor", "stdio")
		cmd.Stdin = strings.NewReader("savevm vm\nquit\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("savevm: %v\n%s", err, out)
		}
	}
	want, rc := runQemuImg(t, "snapshot", "-l", p)
	if rc != 0 {
		t.Fatalf("qemu-img snapshot -l: exit %d", rc)
	}
	var ourRC int
	got := captureStdout(t, func() { ourRC = runImgSnapshot([]string{"-l", p}) })
	if ourRC != 0 || got != want {
		t.Fatalf("snapshot -l (exit %d):\n%s\nqemu-img:\n%s", ourRC, got, want)
	}
	// No snapshots: nothing at all, as qemu-img.
	e := filepath.Join(dir, "empty.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", e, "1M")
	if got := captureStdout(t, func() { runImgSnapshot([]string{"-l", e}) }); got != "" {
		t.Fatalf("listing of an image without snapshots: %q", got)
	}
}

func TestQemuSizeToStr(t *testing.T) {
	for _, c := range []struct {
		v    uint64
		want string
	}{
		{0, "0 B"}, {765, "765 B"}, {999, "999 B"}, {1000, "0.977 KiB"}, {1024, "1 KiB"},
		{1536, "1.5 KiB"}, {10 << 20, "10 MiB"}, {1023 << 20, "0.999 GiB"}, {3 << 40, "3 TiB"},
	} {
		if got := qemuSizeToStr(c.v); got != c.want {
			t.Errorf("qemuSizeToStr(%d) = %q, want %q", c.v, got, c.want)
		}
	}
}

// TestFacesExitCodesLikeQemu runs each command line with qemu-img and with
// our face, each on its own copy of the same image, and compares the exit
// status (and, where the command changes the image, that qemu-img check
// accepts ours).
func TestFacesExitCodesLikeQemu(t *testing.T) {
	peer.Require(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	mustQemu(t, "qemu-io", "-c", "write -P 1 0 1M", base)
	mustQemu(t, "qemu-img", "snapshot", "-c", "s1", base)
	v2 := filepath.Join(dir, "v2.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "64M")

	type face func([]string) int
	faces := map[string]face{"snapshot": runImgSnapshot, "resize": runImgResize, "amend": runImgAmend}
	cases := []struct {
		name string
		img  string // "" = base
		args []string
	}{
		{"snapshot list", "", []string{"snapshot", "-l", "IMG"}},
		{"snapshot list, file first", "", []string{"snapshot", "IMG", "-l"}},
		{"snapshot create", "", []string{"snapshot", "-c", "new", "IMG"}},
		{"snapshot create attached", "", []string{"snapshot", "-cnew", "IMG"}},
		{"snapshot apply", "", []string{"snapshot", "-a", "s1", "IMG"}},
		{"snapshot apply by id", "", []string{"snapshot", "-a", "1", "IMG"}},
		{"snapshot apply missing", "", []string{"snapshot", "-a", "nope", "IMG"}},
		{"snapshot delete", "", []string{"snapshot", "-d", "s1", "IMG"}},
		{"snapshot delete missing", "", []string{"snapshot", "-d", "nope", "IMG"}},
		{"snapshot mixed", "", []string{"snapshot", "-l", "-c", "x", "IMG"}},
		{"snapshot twice", "", []string{"snapshot", "-c", "x", "-c", "y", "IMG"}},
		{"snapshot no file", "", []string{"snapshot", "-l"}},
		{"snapshot two files", "", []string{"snapshot", "-l", "IMG", "IMG"}},
		{"snapshot missing argument", "", []string{"snapshot", "IMG", "-c"}},
		{"snapshot unknown option", "", []string{"snapshot", "-z", "IMG"}},
		{"snapshot -f is not an option", "", []string{"snapshot", "-f", "qcow2", "-l", "IMG"}},
		{"snapshot no action", "", []string{"snapshot", "IMG"}},
		{"snapshot quiet create", "", []string{"snapshot", "-q", "-c", "q", "IMG"}},
		{"snapshot missing file", "", []string{"snapshot", "-l", "/nonexistent.qcow2"}},
		{"resize grow", "", []string{"resize", "IMG", "+1G"}},
		{"resize absolute", "", []string{"resize", "IMG", "128M"}},
		{"resize fraction", "", []string{"resize", "IMG", "+1.5M"}},
		{"resize same", "", []string{"resize", "IMG", "+0"}},
		{"resize shrink refused", "", []string{"resize", "IMG", "32M"}},
		{"resize negative refused", "", []string{"resize", "IMG", "-1M"}},
		{"resize shrink", "", []string{"resize", "--shrink", "IMG", "-1M"}},
		{"resize shrink abbreviated", "", []string{"resize", "--shr", "IMG", "32M"}},
		{"resize option after file", "", []string{"resize", "IMG", "--shrink", "-1M"}},
		{"resize to zero", "", []string{"resize", "--shrink", "IMG", "0"}},
		{"resize below zero", "", []string{"resize", "--shrink", "IMG", "-1G"}},
		{"resize odd size", "", []string{"resize", "IMG", "+1"}},
		{"resize bad size", "", []string{"resize", "IMG", "abc"}},
		{"resize no size", "", []string{"resize", "IMG"}},
		{"resize extra", "", []string{"resize", "IMG", "IMG", "+1M"}},
		{"resize bad preallocation", "", []string{"resize", "--preallocation=foo", "IMG", "+1M"}},
		{"resize v2 with snapshots", "v2snap", []string{"resize", "IMG", "+1M"}},
		{"resize too large", "", []string{"resize", "IMG", "1E"}},
		{"amend compat 0.10", "", []string{"amend", "-o", "compat=0.10", "IMG"}},
		{"amend compat v3 twice", "", []string{"amend", "-o", "compat=v3", "-o", "lazy_refcounts=on", "IMG"}},
		{"amend refcount bits", "", []string{"amend", "-o", "refcount_bits=64", "IMG"}},
		{"amend refcount bits 3", "", []string{"amend", "-o", "refcount_bits=3", "IMG"}},
		{"amend unknown compat", "", []string{"amend", "-o", "compat=0.9", "IMG"}},
		{"amend lazy on v2", "v2", []string{"amend", "-o", "lazy_refcounts=on", "IMG"}},
		{"amend lazy bad value", "", []string{"amend", "-o", "lazy_refcounts=maybe", "IMG"}},
		{"amend creation option", "", []string{"amend", "-o", "cluster_size=4096", "IMG"}},
		{"amend unknown option", "", []string{"amend", "-o", "foo=bar", "IMG"}},
		{"amend no options", "", []string{"amend", "IMG"}},
		{"amend empty options", "", []string{"amend", "-o", "", "IMG"}},
		{"amend help", "", []string{"amend", "-o", "help", "IMG"}},
		{"amend two files", "", []string{"amend", "-o", "compat=1.1", "IMG", "IMG"}},
		{"amend bad cache", "", []string{"amend", "-t", "foo", "-o", "compat=1.1", "IMG"}},
		{"amend size", "", []string{"amend", "-o", "size=32M", "IMG"}},
		{"amend compat 0.10 with lazy", "", []string{"amend", "-o", "compat=0.10,lazy_refcounts=on", "IMG"}},
	}
	v2snap := filepath.Join(dir, "v2snap.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2snap, "64M")
	mustQemu(t, "qemu-img", "snapshot", "-c", "s", v2snap)
	srcs := map[string]string{"": base, "v2": v2, "v2snap": v2snap}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			q := filepath.Join(t.TempDir(), "q.qcow2")
			o := filepath.Join(t.TempDir(), "o.qcow2")
			for _, p := range []string{q, o} {
				b, err := os.ReadFile(srcs[c.img])
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			subst := func(p string) []string {
				out := make([]string, len(c.args))
				for i, a := range c.args {
					out[i] = strings.ReplaceAll(a, "IMG", p)
				}
				return out
			}
			_, want := runQemuImg(t, subst(q)...)
			args := subst(o)
			var got int
			captureStdout(t, func() { got = faces[args[0]](args[1:]) })
			if got != want {
				t.Fatalf("exit status %d, qemu-img %d", got, want)
			}
			if _, rc := runQemuImg(t, "check", "-q", o); rc != 0 {
				t.Fatalf("qemu-img check of our result: exit %d", rc)
			}
		})
	}
}

// TestConvertSnapshotLikeQemu: convert -l exports the same bytes as
// qemu-img convert -l, for every form of the snapshot parameter, and fails
// where qemu-img fails.
func TestConvertSnapshotLikeQemu(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
	mustQemu(t, "qemu-io", "-c", "write -P 1 0 1M", p)
	mustQemu(t, "qemu-img", "snapshot", "-c", "s1", p)
	mustQemu(t, "qemu-io", "-c", "write -P 2 512k 1M", p)
	if rc := runImgSnapshot([]string{"-c", "s2", p}); rc != 0 {
		t.Fatalf("snapshot -c: exit %d", rc)
	}
	mustQemu(t, "qemu-io", "-c", "write -P 3 0 4M", p)
	for _, l := range []string{"snapshot.name=s1", "snapshot.id=2", "snapshot.id=2,snapshot.name=s2", "s1", "2",
		"nope", "snapshot.id=1,snapshot.name=s2", "snapshot.foo=1"} {
		t.Run(l, func(t *testing.T) {
			q, o := filepath.Join(t.TempDir(), "q.raw"), filepath.Join(t.TempDir(), "o.raw")
			_, want := runQemuImg(t, "convert", "-U", "-l", l, "-O", "raw", p, q)
			var got int
			captureStdout(t, func() { got = runImgConvert([]string{"-U", "-l", l, "-O", "raw", p, o}) })
			if got != want {
				t.Fatalf("exit status %d, qemu-img %d", got, want)
			}
			if want != 0 {
				return
			}
			a, err := os.ReadFile(q)
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(o)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(a, b) {
				t.Fatal("export differs from qemu-img's")
			}
		})
	}
}
