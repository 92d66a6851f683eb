package driver

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

// TestDriverErr checks the one translation of domain errors: what driverErr
// makes of each is what the driver's logic tests for, with the code
// toStatus gives the raw error, and the message keeps the original.
func TestDriverErr(t *testing.T) {
	for _, tc := range []struct {
		domain, driver error
		code           codes.Code
	}{
		{snapshotter.ErrNotFound, ErrNotFound, codes.NotFound},
		{qcow2.ErrSnapshotNotFound, ErrNotFound, codes.NotFound},
		{snapshotter.ErrUntrusted, ErrPrecondition, codes.FailedPrecondition},
		{snapshotter.ErrInvalid, ErrInvalid, codes.InvalidArgument},
		{snapshotter.ErrOutOfRange, ErrOutOfRange, codes.OutOfRange},
		{qcow2.ErrLocked, ErrInUse, codes.FailedPrecondition},
		{qcow2.ErrCorrupt, ErrPrecondition, codes.FailedPrecondition},
	} {
		t.Run(tc.domain.Error(), func(t *testing.T) {
			raw := fmt.Errorf("snapshot %q: %w", "s", tc.domain)
			got := driverErr(raw)
			if !errors.Is(got, tc.driver) || !errors.Is(got, tc.domain) {
				t.Errorf("driverErr(%v) = %v: want it to wrap %v and %v", raw, got, tc.driver, tc.domain)
			}
			if want := tc.driver.Error() + ": " + raw.Error(); got.Error() != want {
				t.Errorf("driverErr message %q, want %q", got, want)
			}
			if again := driverErr(got); again != got {
				t.Errorf("driverErr wrapped %v again: %v", got, again)
			}
			if c := codeOf(raw); c != tc.code {
				t.Errorf("codeOf(%v) = %v, want %v", raw, c, tc.code)
			}
			if c := codeOf(got); c != tc.code {
				t.Errorf("codeOf(%v) = %v, want %v", got, c, tc.code)
			}
		})
	}
	plain := errors.New("disk on fire")
	if driverErr(plain) != plain || driverErr(nil) != nil {
		t.Error("driverErr changed an error that means nothing to the driver")
	}
	if err := imageErr("/pool/v.qcow2", fmt.Errorf("open: %w", qcow2.ErrLocked)); !errors.Is(err, ErrInUse) ||
		err.Error() != "image /pool/v.qcow2: volume in use: open: "+qcow2.ErrLocked.Error() {
		t.Errorf("imageErr of a locked image = %v", err)
	}
}
