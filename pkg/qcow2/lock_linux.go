package qcow2

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// qemu's image locking (block/file-posix.c): one byte per permission at
// 100+bit ("I use this permission") and one at 200+bit ("I do not let
// others use this permission"), taken as shared OFD locks and probed with
// F_OFD_GETLK for a write lock. Permission bits are qemu's BLK_PERM_*.
const (
	lockPermBase   = 100
	lockSharedBase = 200

	permConsistentRead = 0
	permWrite          = 1
	permWriteUnchanged = 2
	permResize         = 3
)

var permNames = map[int]string{
	permConsistentRead: "consistent read",
	permWrite:          "write",
	permWriteUnchanged: "write unchanged",
	permResize:         "resize",
}

type imageLock struct {
	f     *os.File
	bytes []int64
}

// lockImage takes qemu's locks for a read-only or read-write user that does
// not share write or resize with others (what qemu does for a qcow2 file).
func lockImage(f *os.File, write bool) (*imageLock, error) {
	perms := []int{permConsistentRead}
	if write {
		perms = append(perms, permWrite, permResize)
	}
	unshared := []int{permWrite, permResize}
	l := &imageLock{f: f}
	fd := int(f.Fd())
	for _, p := range perms {
		if err := l.take(fd, lockPermBase+int64(p)); err != nil {
			l.release()
			return nil, fmt.Errorf("%w: failed to get %q lock: %v", ErrLocked, permNames[p], err)
		}
	}
	for _, p := range unshared {
		if err := l.take(fd, lockSharedBase+int64(p)); err != nil {
			l.release()
			return nil, fmt.Errorf("%w: failed to get shared %q lock: %v", ErrLocked, permNames[p], err)
		}
	}
	// Someone else refusing to share what we use?
	for _, p := range perms {
		if held, err := probe(fd, lockSharedBase+int64(p)); err != nil || held {
			l.release()
			return nil, fmt.Errorf("%w: failed to get %q lock: another process has the image open and does not share it (is it in use by qemu or qcow2-csi?)", ErrLocked, permNames[p])
		}
	}
	// Someone else using what we refuse to share?
	for _, p := range unshared {
		if held, err := probe(fd, lockPermBase+int64(p)); err != nil || held {
			l.release()
			return nil, fmt.Errorf("%w: failed to get shared %q lock: another process has the image open for %s", ErrLocked, permNames[p], permNames[p])
		}
	}
	return l, nil
}

func (l *imageLock) take(fd int, b int64) error {
	fl := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: b, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &fl); err != nil {
		return err
	}
	l.bytes = append(l.bytes, b)
	return nil
}

func probe(fd int, b int64) (bool, error) {
	fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: b, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &fl); err != nil {
		return false, err
	}
	return fl.Type != unix.F_UNLCK, nil
}

func (l *imageLock) release() {
	fd := int(l.f.Fd())
	for _, b := range l.bytes {
		fl := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: b, Len: 1}
		_ = unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &fl)
	}
	l.bytes = nil
}
