// Package nbdattach is the contract between a block device's data and the
// code that exposes it: a Backend (and its optional capabilities
// BlockStatuser and MetaContextProvider), the Attacher and Device that turn
// a Backend into a kernel block device, and the sentinel errors both sides
// use. It also holds FileBackend, a Backend over a plain file.
//
// The implementations live in subpackages, each with only the imports its
// job needs:
//
//   - nbd: the NBD protocol server (standard library only): a Server that
//     negotiates with clients such as qemu-img, nbdinfo and fio, and
//     ServeTransmission for a socket handed to the kernel.
//   - kernel: the "nbd" Attacher, the Linux kernel's NBD driver configured
//     over generic netlink, served by package nbd over socketpairs.
//   - fuse: the "fuse" Attacher, a FUSE-served file behind a loop device,
//     for kernels without nbd. It uses nothing of the other two.
//
// Package imagebackend adapts a qcow2 image to Backend; nothing here imports
// pkg/qcow2.
//
// # Errors
//
// A Backend wraps ErrNoSpace, ErrInvalid, ErrPermission, ErrOverflow,
// ErrNotSupported or ErrShutdown (or passes a syscall.Errno through) to
// choose the error its client sees: the NBD server maps them to NBD error
// values, the fuse backend to errnos. Anything else is EIO. The attach
// backends report ErrUnavailable, ErrNotAttached, ErrAlreadyAttached and
// ErrDeviceBusy, wrapped in an error that says what to do.
package nbdattach
