//go:build linux

package kernel

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// TestAvailableWithoutModule checks the error a node without nbd gets.
// These machines' kernel has no nbd module; the VM suite (tests/vm) covers
// a kernel that has it.
func TestAvailableWithoutModule(t *testing.T) {
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		t.Skip("this kernel has nbd loaded; the no-module error cannot be observed here (tests/vm covers the loaded case)")
	}
	a := NewAttacher(Options{})
	err := a.Available()
	if !errors.Is(err, nbdattach.ErrUnavailable) {
		t.Fatalf("Available() = %v, want an error wrapping ErrUnavailable", err)
	}
	for _, want := range []string{"no nbd driver", "modprobe nbd", "fuse attach backend"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Available() = %q, want it to mention %q", err, want)
		}
	}
	// Every operation that needs the driver says the same.
	_, err = a.List(context.Background())
	if !errors.Is(err, nbdattach.ErrUnavailable) {
		t.Errorf("List() = %v, want ErrUnavailable", err)
	}
}
