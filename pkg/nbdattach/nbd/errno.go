package nbd

import (
	"context"
	"errors"
	"syscall"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// Errors of the server itself.
var (
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
	case errors.Is(err, nbdattach.ErrNoSpace):
		return nbdENOSPC
	case errors.Is(err, nbdattach.ErrInvalid):
		return nbdEINVAL
	case errors.Is(err, nbdattach.ErrPermission):
		return nbdEPERM
	case errors.Is(err, nbdattach.ErrOverflow):
		return nbdEOVERFLOW
	case errors.Is(err, nbdattach.ErrNotSupported):
		return nbdENOTSUP
	case errors.Is(err, nbdattach.ErrShutdown), errors.Is(err, context.Canceled):
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
