package driver

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

func TestToStatus(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("volume %q: %w", "v", err) }
	tests := []struct {
		err  error
		code codes.Code
	}{
		{wrap(ErrInvalid), codes.InvalidArgument},
		{wrap(qcow2.ErrInvalidOption), codes.InvalidArgument},
		{wrap(ErrNotFound), codes.NotFound},
		{wrap(nbdattach.ErrNotAttached), codes.NotFound},
		{wrap(ErrAlreadyExists), codes.AlreadyExists},
		{wrap(ErrOutOfRange), codes.OutOfRange},
		{wrap(qcow2.ErrOutOfRange), codes.OutOfRange},
		{wrap(ErrNoSpace), codes.ResourceExhausted},
		{wrap(qcow2.ErrNoSpace), codes.ResourceExhausted},
		{wrap(syscall.ENOSPC), codes.ResourceExhausted},
		{wrap(syscall.EDQUOT), codes.ResourceExhausted},
		{wrap(ErrBusy), codes.Aborted},
		{wrap(ErrBadToken), codes.Aborted},
		{wrap(ErrInUse), codes.FailedPrecondition},
		{wrap(ErrPrecondition), codes.FailedPrecondition},
		{wrap(nbdattach.ErrUnavailable), codes.FailedPrecondition},
		{wrap(nbdattach.ErrAlreadyAttached), codes.FailedPrecondition},
		{wrap(nbdattach.ErrDeviceBusy), codes.FailedPrecondition},
		{wrap(qcow2.ErrLocked), codes.FailedPrecondition},
		{wrap(qcow2.ErrCorrupt), codes.FailedPrecondition},
		{wrap(qcow2.ErrNotQcow2), codes.FailedPrecondition},
		{wrap(qcow2.ErrUnsupported), codes.FailedPrecondition},
		{wrap(qcow2.ErrReadOnly), codes.FailedPrecondition},
		{wrap(context.DeadlineExceeded), codes.DeadlineExceeded},
		{wrap(context.Canceled), codes.Canceled},
		{wrap(errors.New("disk on fire")), codes.Internal},
		{status.Error(codes.Unavailable, "as is"), codes.Unavailable},
	}
	for _, tc := range tests {
		t.Run(tc.err.Error(), func(t *testing.T) {
			s := status.Convert(toStatus(tc.err))
			if s.Code() != tc.code || s.Message() != tc.err.Error() && s.Message() != "as is" {
				t.Fatalf("toStatus = %v %q, want %v %q", s.Code(), s.Message(), tc.code, tc.err.Error())
			}
		})
	}
	if toStatus(nil) != nil {
		t.Fatal("toStatus(nil) != nil")
	}
}
