package nbdattach

import (
	"context"
	"errors"
	"syscall"
)

// Errors a Backend returns (wrapped with %w) to choose the NBD error a client
// sees. Any other error is reported as EIO. A syscall.Errno anywhere in the
// chain is mapped as well, so a file-backed Backend can pass os errors through.
var (
	// ErrNoSpace: the backing store is full (ENOSPC).
	ErrNoSpace = errors.New("no space left on backing store")
	// ErrInvalid: the request is malformed (EINVAL).
	ErrInvalid = errors.New("invalid request")
	// ErrPermission: the export refuses the operation, e.g. a write to a
	// read-only export (EPERM).
	ErrPermission = errors.New("operation not permitted")
	// ErrOverflow: the request is larger than the server will serve (EOVERFLOW).
	ErrOverflow = errors.New("request too large")
	// ErrNotSupported: the backend cannot do this, e.g. a fast zero that would
	// be slow (ENOTSUP).
	ErrNotSupported = errors.New("operation not supported")
	// ErrShutdown: the server is shutting down (ESHUTDOWN).
	ErrShutdown = errors.New("server shutting down")

	// ErrProtocol: a client broke the protocol; the connection is closed.
	ErrProtocol = errors.New("nbd protocol violation")
	// ErrUnknownExport: the client asked for an export the server does not have.
	ErrUnknownExport = errors.New("unknown export")
)

// nbdErrno maps an error from a Backend to the error value of the NBD wire.
func nbdErrno(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrNoSpace):
		return nbdENOSPC
	case errors.Is(err, ErrInvalid):
		return nbdEINVAL
	case errors.Is(err, ErrPermission):
		return nbdEPERM
	case errors.Is(err, ErrOverflow):
		return nbdEOVERFLOW
	case errors.Is(err, ErrNotSupported):
		return nbdENOTSUP
	case errors.Is(err, ErrShutdown), errors.Is(err, context.Canceled):
		return nbdESHUTDOWN
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return nbdENOSPC
		case syscall.EINVAL:
			return nbdEINVAL
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return nbdEPERM
		case syscall.EOVERFLOW:
			return nbdEOVERFLOW
		case syscall.EOPNOTSUPP, syscall.ENOSYS:
			return nbdENOTSUP
		case syscall.ENOMEM:
			return nbdENOMEM
		}
	}
	return nbdEIO
}
