package driver

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
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
	// ErrHoldExpired: a group snapshot's commit came after the node had
	// released its members' I/O at its deadline: the point in time is
	// lost and the group snapshot is aborted; the CO retries (Aborted).
	ErrHoldExpired = errors.New("group snapshot hold expired")
)

// meanings are what the domain packages' sentinel errors mean to the driver:
// the one place they are translated, for the driver's logic (driverErr) and
// for gRPC codes (codeOf) alike.
var meanings = []struct{ domain, driver error }{
	{qcow2.ErrInvalidOption, ErrInvalid},
	{snapshotter.ErrInvalid, ErrInvalid},
	{throttle.ErrInvalid, ErrInvalid},
	// The Secret's passphrase opens no key slot of an encrypted volume,
	// or the volume came without its Secret.
	{qcow2.ErrWrongPassphrase, ErrInvalid},
	{qcow2.ErrKeyRequired, ErrInvalid},
	{nbdattach.ErrNotAttached, ErrNotFound},
	{snapshotter.ErrNotFound, ErrNotFound},
	{qcow2.ErrSnapshotNotFound, ErrNotFound},
	{qcow2.ErrOutOfRange, ErrOutOfRange},
	{snapshotter.ErrOutOfRange, ErrOutOfRange},
	{syscall.ENOSPC, ErrNoSpace},
	{syscall.EDQUOT, ErrNoSpace},
	// An image another process holds.
	{qcow2.ErrLocked, ErrInUse},
	{snapshotter.ErrUntrusted, ErrPrecondition},
	{nbdattach.ErrUnavailable, ErrPrecondition},
	{nbdattach.ErrAlreadyAttached, ErrPrecondition},
	{nbdattach.ErrDeviceBusy, ErrPrecondition},
	// An image that needs an operator (qcow2-csi img check) before it can
	// be used.
	{qcow2.ErrCorrupt, ErrPrecondition},
	{qcow2.ErrNotQcow2, ErrPrecondition},
	{qcow2.ErrUnsupported, ErrPrecondition},
	{qcow2.ErrReadOnly, ErrPrecondition},
	// I/O limits on a device no throttle serves.
	{throttle.ErrCompiledOut, ErrPrecondition},
}

// codeTable gives each sentinel its gRPC code. The first that err is, or
// that one of err's domain sentinels means, decides.
var codeTable = []struct {
	sentinel error
	code     codes.Code
}{
	{ErrInvalid, codes.InvalidArgument},
	{ErrNotFound, codes.NotFound},
	{ErrAlreadyExists, codes.AlreadyExists},
	{ErrOutOfRange, codes.OutOfRange},
	{ErrNoSpace, codes.ResourceExhausted},
	{ErrBusy, codes.Aborted},
	{ErrHoldExpired, codes.Aborted},
	{ErrBadToken, codes.Aborted},
	{ErrInUse, codes.FailedPrecondition},
	{ErrPrecondition, codes.FailedPrecondition},
	{ErrUnavailable, codes.Unavailable},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
	{context.Canceled, codes.Canceled},
}

// means reports whether err is sentinel or wraps a domain error that means
// it.
func means(err, sentinel error) bool {
	if errors.Is(err, sentinel) {
		return true
	}
	for _, m := range meanings {
		if m.driver == sentinel && errors.Is(err, m.domain) {
			return true
		}
	}
	return false
}

// driverErr wraps err, from a domain package, with the driver sentinel its
// own sentinel means, so that the driver's logic can test for it; an error
// that already carries it, or means nothing to the driver, is returned as is.
func driverErr(err error) error {
	for _, m := range meanings {
		if errors.Is(err, m.domain) {
			if errors.Is(err, m.driver) {
				return err
			}
			return fmt.Errorf("%w: %w", m.driver, err)
		}
	}
	return err
}

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
	for _, c := range codeTable {
		if means(err, c.sentinel) {
			return c.code
		}
	}
	return codes.Internal
}
