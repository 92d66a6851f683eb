package main

import (
	"os"
	"path/filepath"
	"testing"
)

// TestImgFileMode: the img face makes files with qemu-img's mode (0644
// through the umask), unlike the driver, whose pool images are 0600: an
// operator's scripts that expect qemu-img's result get it.
func TestImgFileMode(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p("q.qcow2"), "1M")
	mustQemu(t, "qemu-img", "convert", "-O", "qcow2", p("q.qcow2"), p("qc.qcow2"))
	mustQemu(t, "qemu-img", "create", "-q", "-f", "raw", p("q.raw"), "1M")
	for _, args := range [][]string{
		{"create", "-q", "-f", "qcow2", p("o.qcow2"), "1M"},
		{"convert", "-O", "qcow2", p("q.qcow2"), p("oc.qcow2")},
		{"create", "-q", "-f", "raw", p("o.raw"), "1M"},
		{"convert", "-O", "raw", p("q.qcow2"), p("oc.raw")},
	} {
		if code, out, errs := capture(t, args...); code != 0 {
			t.Fatalf("img %v: exit %d\n%s%s", args, code, out, errs)
		}
	}
	mode := func(n string) os.FileMode {
		fi, err := os.Stat(p(n))
		if err != nil {
			t.Fatal(err)
		}
		return fi.Mode().Perm()
	}
	for ours, qemu := range map[string]string{"o.qcow2": "q.qcow2", "oc.qcow2": "qc.qcow2", "o.raw": "q.raw", "oc.raw": "q.raw"} {
		if mode(ours) != mode(qemu) {
			t.Errorf("%s: mode %#o, qemu-img made %s %#o", ours, mode(ours), qemu, mode(qemu))
		}
	}
}
