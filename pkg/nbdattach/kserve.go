package nbdattach

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
)

// kernelExport is what the kernel attach needs from an NBD server: the
// transmission flags the export advertises (handed to the kernel as
// NBD_ATTR_SERVER_FLAGS, since no handshake happens on a kernel socket) and a
// loop that serves one socket from the transmission phase with simple replies.
type kernelExport interface {
	transmissionFlags() uint16
	serve(ctx context.Context, conn net.Conn) error
}

// newKernelExport is the seam to the NBD server.
//
// TEMPORARY: until the protocol server lands on main this is a minimal
// sequential simple-reply loop (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC)
// so that the attach and the VM harness can be built and tested; it is
// replaced by a call into the real server.
var newKernelExport = func(b Backend, readOnly bool) kernelExport {
	return &miniExport{b: b, ro: readOnly}
}

const (
	ksRequestMagic = 0x25609513
	ksReplyMagic   = 0x67446698

	ksFlagHasFlags        = 1 << 0
	ksFlagReadOnly        = 1 << 1
	ksFlagSendFlush       = 1 << 2
	ksFlagSendFUA         = 1 << 3
	ksFlagSendTrim        = 1 << 5
	ksFlagSendWriteZeroes = 1 << 6
	ksFlagCanMultiConn    = 1 << 8

	ksCmdRead        = 0
	ksCmdWrite       = 1
	ksCmdDisc        = 2
	ksCmdFlush       = 3
	ksCmdTrim        = 4
	ksCmdWriteZeroes = 6

	ksCmdFlagFUA    = 1 << 0
	ksCmdFlagNoHole = 1 << 1

	ksMaxPayload = 32 << 20
)

type miniExport struct {
	b  Backend
	ro bool
}

func (e *miniExport) transmissionFlags() uint16 {
	f := uint16(ksFlagHasFlags | ksFlagSendFlush | ksFlagSendFUA | ksFlagCanMultiConn)
	if e.ro {
		return f | ksFlagReadOnly
	}
	return f | ksFlagSendTrim | ksFlagSendWriteZeroes
}

func (e *miniExport) serve(ctx context.Context, conn net.Conn) error {
	var hdr [28]byte
	var buf []byte
	for {
		if _, err := io.ReadFull(conn, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if binary.BigEndian.Uint32(hdr[0:]) != ksRequestMagic {
			return fmt.Errorf("nbd: bad request magic %#x", binary.BigEndian.Uint32(hdr[0:]))
		}
		flags := binary.BigEndian.Uint16(hdr[4:])
		typ := binary.BigEndian.Uint16(hdr[6:])
		cookie := hdr[8:16]
		off := int64(binary.BigEndian.Uint64(hdr[16:]))
		n := int64(binary.BigEndian.Uint32(hdr[24:]))
		if (typ == ksCmdWrite || typ == ksCmdRead) && n > ksMaxPayload {
			return fmt.Errorf("nbd: request length %d exceeds %d", n, ksMaxPayload)
		}
		var errno syscall.Errno
		inRange := off >= 0 && off+n <= e.b.Size()
		var data []byte
		switch typ {
		case ksCmdDisc:
			return nil
		case ksCmdWrite:
			if int64(cap(buf)) < n {
				buf = make([]byte, n)
			}
			data = buf[:n]
			if _, err := io.ReadFull(conn, data); err != nil {
				return err
			}
			switch {
			case e.ro:
				errno = syscall.EPERM
			case !inRange:
				errno = syscall.ENOSPC
			default:
				errno = ksErrno(e.b.WriteAt(ctx, data, off, flags&ksCmdFlagFUA != 0))
			}
			data = nil
		case ksCmdRead:
			if !inRange {
				errno = syscall.EINVAL
				break
			}
			if int64(cap(buf)) < n {
				buf = make([]byte, n)
			}
			data = buf[:n]
			errno = ksErrno(e.b.ReadAt(ctx, data, off))
		case ksCmdFlush:
			errno = ksErrno(e.b.Flush(ctx))
		case ksCmdTrim, ksCmdWriteZeroes:
			switch {
			case e.ro:
				errno = syscall.EPERM
			case !inRange:
				errno = syscall.ENOSPC
			case typ == ksCmdTrim:
				errno = ksErrno(e.b.Trim(ctx, off, n))
			default:
				errno = ksErrno(e.b.WriteZeroes(ctx, off, n, ZeroFlags{NoHole: flags&ksCmdFlagNoHole != 0, FUA: flags&ksCmdFlagFUA != 0}))
			}
		default:
			errno = syscall.EINVAL
		}
		var rep [16]byte
		binary.BigEndian.PutUint32(rep[0:], ksReplyMagic)
		binary.BigEndian.PutUint32(rep[4:], uint32(errno))
		copy(rep[8:], cookie)
		if errno != 0 {
			data = nil
		}
		if _, err := (&net.Buffers{rep[:], data}).WriteTo(conn); err != nil {
			return err
		}
	}
}

func ksErrno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.ENOSPC, syscall.EPERM, syscall.EINVAL, syscall.ENOTSUP:
			return en
		}
	}
	return syscall.EIO
}
