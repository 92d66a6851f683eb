package qcow2

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// qemu runs a qemu tool and returns its stdout; failure fails the test.
func qemu(t testing.TB, tool string, args ...string) string {
	t.Helper()
	out, errb, err := peer.Run(context.Background(), t, tool, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", tool, strings.Join(args, " "), err, out, errb)
	}
	return string(out)
}

// qemuRaw returns the guest contents of an image as qemu-img reads them.
func qemuRaw(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "raw")
	qemu(t, "qemu-img", "convert", "-U", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ourRaw returns the guest contents as this package reads them.
func ourRaw(t testing.TB, path string) []byte {
	t.Helper()
	return ourRawWith(t, path, OpenOptions{})
}

// ourRawWith is ourRaw with more open options (a passphrase).
func ourRawWith(t testing.TB, path string, o OpenOptions) []byte {
	t.Helper()
	o.ReadOnly, o.NoLock = true, true
	img, err := Open(path, o)
	if err != nil {
		t.Fatalf("Open %s: %v", path, err)
	}
	defer img.Close()
	b := make([]byte, img.Size())
	if n, err := img.ReadAt(b, 0); err != nil || n != len(b) {
		t.Fatalf("ReadAt: n=%d err=%v", n, err)
	}
	return b
}

// mapEntry is one element of qemu-img map --output=json.
type mapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
}

func (m mapEntry) String() string {
	o := "-"
	if m.Offset != nil {
		o = fmt.Sprint(*m.Offset)
	}
	return fmt.Sprintf("{%d+%d d%d p%t z%t D%t off=%s}", m.Start, m.Length, m.Depth, m.Present, m.Zero, m.Data, o)
}

func qemuMap(t testing.TB, path string) []mapEntry {
	t.Helper()
	var m []mapEntry
	if err := json.Unmarshal([]byte(qemu(t, "qemu-img", "map", "-U", "--output=json", path)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func ourMap(t testing.TB, path string) []mapEntry {
	t.Helper()
	img, err := Open(path, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Fatalf("Open %s: %v", path, err)
	}
	defer img.Close()
	ext, err := img.BlockStatus(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	out := make([]mapEntry, 0, len(ext))
	for _, x := range ext {
		m := mapEntry{Start: x.Start, Length: x.Length, Depth: x.Depth, Present: x.Present, Zero: x.Zero, Data: x.Data}
		if x.Offset >= 0 {
			o := x.Offset
			m.Offset = &o
		}
		out = append(out, m)
	}
	return out
}

func sameMap(a, b []mapEntry) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].String() != b[i].String() {
			return false
		}
	}
	return true
}

// qemuCheck runs qemu-img check --output=json and returns the parsed result
// and exit code.
type checkResult struct {
	Corruptions int `json:"corruptions"`
	Leaks       int `json:"leaks"`
	CheckErrors int `json:"check-errors"`
}

func qemuCheck(t testing.TB, path string) (checkResult, string) {
	t.Helper()
	p := peer.Require(t, "qemu-img")
	out, _ := exec.Command(p, "check", "-U", "--output=json", path).Output()
	var r checkResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("qemu-img check %s: %v: %s", path, err, out)
	}
	return r, string(out)
}

func mkdir(t testing.TB, p string) {
	t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
}
