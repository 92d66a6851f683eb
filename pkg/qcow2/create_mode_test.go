package qcow2

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestCreateMode: a new image is readable by its owner only unless the
// caller asks otherwise; an image holds a whole disk's data, so the safe
// default is the one a library caller gets without thinking about it.
// Modes go through the umask as open(2) does (qemu-img's behaviour).
func TestCreateMode(t *testing.T) {
	umask := syscall.Umask(0)
	syscall.Umask(umask)
	for _, tc := range []struct {
		name string
		mode fs.FileMode
		want fs.FileMode
	}{
		{"default", 0, 0o600},
		{"qemu-img", 0o644, 0o644 &^ fs.FileMode(umask)},
		{"group", 0o640, 0o640 &^ fs.FileMode(umask)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "m.qcow2")
			img, err := Create(p, CreateOptions{Size: 1 << 20, Mode: tc.mode})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode().Perm(); got != tc.want {
				t.Fatalf("mode %#o, want %#o (umask %#o)", got, tc.want, umask)
			}
		})
	}
	_, err := Create(filepath.Join(t.TempDir(), "bad.qcow2"), CreateOptions{Size: 1 << 20, Mode: fs.ModeSetuid | 0o600})
	if !errors.Is(err, ErrInvalidOption) {
		t.Fatalf("setuid mode: %v, want ErrInvalidOption", err)
	}
}
