package driver

import (
	"context"
	"errors"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Sentinel errors of the driver's own logic. Functions below the RPC layer
// wrap them with %w and a message naming the volume and what is wrong; only
// toStatus turns them into gRPC codes.
var (
	// ErrInvalid: a request field is malformed or unsupported.
	ErrInvalid = errors.New("invalid argument")
	// ErrNotFound: no such volume (or staged volume, or path).
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: a volume of that name exists with other parameters,
	// or a volume is staged/published elsewhere with other capabilities.
	ErrAlreadyExists = errors.New("already exists with incompatible parameters")
	// ErrOutOfRange: a capacity the driver cannot provide (too large, shrink).
	ErrOutOfRange = errors.New("capacity out of range")
	// ErrNoSpace: the pool cannot hold the volume (reserve included).
	ErrNoSpace = errors.New("pool out of space")
	// ErrBusy: a conflicting operation on the same volume is in progress;
	// the CO retries (Aborted).
	ErrBusy = errors.New("conflicting operation in progress")
	// ErrBadToken: a ListVolumes starting_token this driver did not issue.
	ErrBadToken = errors.New("invalid starting token")
	// ErrInUse: the volume is staged, published or its image is opened by
	// another process, and the operation needs it idle.
	ErrInUse = errors.New("volume in use")
	// ErrPrecondition: the node or volume is not in a state that allows the
	// operation; the message says what to do.
	ErrPrecondition = errors.New("failed precondition")
	// ErrUnavailable: the controller cannot reach the agent of the node
	// that owns the volume; the CO retries.
	ErrUnavailable = errors.New("node agent unavailable")
)

// toStatus maps an error to a gRPC status, in one place. Errors that already
// are statuses pass through unchanged.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(codeOf(err), err.Error())
}

func codeOf(err error) codes.Code {
	switch {
	case errors.Is(err, ErrInvalid), errors.Is(err, qcow2.ErrInvalidOption), errors.Is(err, throttle.ErrInvalid):
		return codes.InvalidArgument
	case errors.Is(err, ErrNotFound), errors.Is(err, nbdattach.ErrNotAttached):
		return codes.NotFound
	case errors.Is(err, ErrAlreadyExists):
		return codes.AlreadyExists
	case errors.Is(err, ErrOutOfRange), errors.Is(err, qcow2.ErrOutOfRange):
		return codes.OutOfRange
	case errors.Is(err, ErrNoSpace), errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return codes.ResourceExhausted
	case errors.Is(err, ErrBusy), errors.Is(err, ErrBadToken):
		return codes.Aborted
	case errors.Is(err, ErrInUse), errors.Is(err, ErrPrecondition), errors.Is(err, nbdattach.ErrUnavailable),
		errors.Is(err, nbdattach.ErrAlreadyAttached), errors.Is(err, nbdattach.ErrDeviceBusy),
		// An image another process holds, or one that needs an operator
		// (qcow2-csi img check) before it can be used.
		errors.Is(err, qcow2.ErrLocked), errors.Is(err, qcow2.ErrCorrupt), errors.Is(err, qcow2.ErrNotQcow2),
		errors.Is(err, qcow2.ErrUnsupported), errors.Is(err, qcow2.ErrReadOnly),
		// I/O limits on a device no throttle serves.
		errors.Is(err, throttle.ErrCompiledOut):
		return codes.FailedPrecondition
	case errors.Is(err, ErrUnavailable):
		return codes.Unavailable
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	}
	return codes.Internal
}
