package fuse

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// Loop devices are the block half of the fuse backend: the kernel's loop
// driver turns reads and writes of /dev/loopN into reads and writes of the
// file the FUSE server exposes. Everything here is ioctls and sysfs; nothing
// is cached, because other processes (udev, other plugins, losetup) share the
// same pool of devices.

const (
	loopControlPath = "/dev/loop-control"
	sysBlock        = "/sys/block"
	// loopNameMarker prefixes lo_file_name (64 bytes, shown by losetup) so
	// that a restarted plugin recognises its devices even when the FUSE mount
	// that backs them lives in a mount namespace it cannot see.
	loopNameMarker = "qcow2-csi-fuse:"
)

// loopDevice is a bound loop device this process holds open. The open file
// keeps the device bound: it is configured with autoclear, so the kernel
// unbinds it when the last opener closes it, including when this process dies.
type loopDevice struct {
	num  int
	f    *os.File
	path string
	dio  bool
}

func loopPath(num int) string { return "/dev/loop" + strconv.Itoa(num) }

// loopConfig is what bindLoop sets up in one LOOP_CONFIGURE call.
type loopConfig struct {
	backing   *os.File
	blockSize uint32
	readOnly  bool
	directIO  bool
	name      string // lo_file_name, truncated to 63 bytes
}

// bindLoop finds a free loop device and binds it to cfg.backing. A device
// another process grabs between LOOP_CTL_GET_FREE and LOOP_CONFIGURE answers
// EBUSY: try the next free one a bounded number of times.
func bindLoop(cfg loopConfig) (*loopDevice, error) {
	ctl, err := os.OpenFile(loopControlPath, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", loopControlPath, err)
	}
	defer ctl.Close()

	var lastErr error
	for attempt := 0; attempt < 16; attempt++ {
		num, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		ld, err := configureLoop(num, cfg)
		if err == nil {
			return ld, nil
		}
		lastErr = err
		if !errors.Is(err, unix.EBUSY) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("no free loop device after 16 attempts: %w", lastErr)
}

func configureLoop(num int, cfg loopConfig) (*loopDevice, error) {
	path := loopPath(num)
	flags := os.O_RDWR
	if cfg.readOnly {
		flags = os.O_RDONLY
	}
	f, err := openLoopNode(path, num, flags)
	if err != nil {
		return nil, err
	}
	lc := unix.LoopConfig{
		Fd:   uint32(cfg.backing.Fd()),
		Size: cfg.blockSize, // the kernel's loop_config.block_size
	}
	lc.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
	if cfg.readOnly {
		lc.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	if cfg.directIO {
		lc.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	copy(lc.Info.File_name[:len(lc.Info.File_name)-1], cfg.name)
	err = unix.IoctlLoopConfigure(int(f.Fd()), &lc)
	if err != nil && cfg.directIO && errors.Is(err, unix.EINVAL) {
		// Kernels that cannot do direct I/O on this backing file refuse the
		// flag instead of ignoring it: fall back to buffered loop I/O.
		lc.Info.Flags &^= unix.LO_FLAGS_DIRECT_IO
		err = unix.IoctlLoopConfigure(int(f.Fd()), &lc)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("LOOP_CONFIGURE %s: %w", path, err)
	}
	ld := &loopDevice{num: num, f: f, path: path}
	ld.dio = readSysfsString(filepath.Join(sysBlock, "loop"+strconv.Itoa(num), "loop", "dio")) == "1"
	return ld, nil
}

// openLoopNode opens /dev/loopN. In a container whose /dev is not devtmpfs the
// node of a freshly created device may be missing: create it from sysfs.
func openLoopNode(path string, num int, flags int) (*os.File, error) {
	f, err := os.OpenFile(path, flags|unix.O_CLOEXEC, 0)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		return f, nil
	}
	dev := readSysfsString(filepath.Join(sysBlock, "loop"+strconv.Itoa(num), "dev"))
	major, minor, ok := strings.Cut(dev, ":")
	if !ok {
		return nil, fmt.Errorf("open %s: %w (and no device number in sysfs)", path, err)
	}
	ma, err1 := strconv.ParseUint(major, 10, 32)
	mi, err2 := strconv.ParseUint(minor, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("open %s: bad sysfs dev %q", path, dev)
	}
	if err := unix.Mknod(path, unix.S_IFBLK|0o600, int(unix.Mkdev(uint32(ma), uint32(mi)))); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("mknod %s: %w", path, err)
	}
	f, err = os.OpenFile(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return f, nil
}

// setCapacity makes the loop device re-read its backing file's size.
func (ld *loopDevice) setCapacity() error {
	if err := unix.IoctlSetInt(int(ld.f.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("LOOP_SET_CAPACITY %s: %w", ld.path, err)
	}
	return nil
}

// busy reports whether anyone but this process holds the device open
// exclusively (a mounted filesystem does): an O_EXCL open fails with EBUSY.
func (ld *loopDevice) busy() bool {
	f, err := os.OpenFile(ld.path, os.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return errors.Is(err, unix.EBUSY)
	}
	f.Close()
	return false
}

// release flushes the device, asks the kernel to unbind it and closes this
// process's descriptor; with autoclear, the unbind happens at the last close
// (a udev probe may hold the device for a moment longer). It then waits, up to
// deadline, for the kernel to let go of the backing file. A failed flush
// (the FUSE connection is gone) is returned apart: the unbind goes on.
func (ld *loopDevice) release(deadline time.Time) (flushErr, err error) {
	fd := int(ld.f.Fd())
	var errs []error
	if err := unix.Fsync(fd); err != nil {
		flushErr = fmt.Errorf("fsync %s: %w", ld.path, err)
	}
	if err := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		errs = append(errs, fmt.Errorf("LOOP_CLR_FD %s: %w", ld.path, err))
	}
	ld.f.Close()
	if err := waitLoopUnbound(ld.num, deadline); err != nil {
		errs = append(errs, err)
	}
	return flushErr, errors.Join(errs...)
}

func waitLoopUnbound(num int, deadline time.Time) error {
	bf := filepath.Join(sysBlock, "loop"+strconv.Itoa(num), "loop", "backing_file")
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		if _, err := os.Stat(bf); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still bound to its backing file (someone holds it open)", loopPath(num))
		}
		time.Sleep(delay)
	}
}

// loopStatus is one bound loop device as sysfs and LOOP_GET_STATUS64 show it.
type loopStatus struct {
	num         int
	backingFile string // as d_path in this mount namespace renders it
	name        string // lo_file_name
	statusErr   error  // why LOOP_GET_STATUS64 failed, if it did
	size        int64  // bytes
}

// scanLoops lists the bound loop devices of the node.
func scanLoops() ([]loopStatus, error) {
	ents, err := os.ReadDir(sysBlock)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", sysBlock, err)
	}
	var out []loopStatus
	for _, e := range ents {
		num, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "loop"))
		if err != nil || !strings.HasPrefix(e.Name(), "loop") {
			continue
		}
		dir := filepath.Join(sysBlock, e.Name())
		bf := readSysfsString(filepath.Join(dir, "loop", "backing_file"))
		if bf == "" {
			continue // not bound
		}
		st := loopStatus{num: num, backingFile: bf}
		if s, err := strconv.ParseInt(readSysfsString(filepath.Join(dir, "size")), 10, 64); err == nil {
			st.size = s * 512
		}
		st.name, st.statusErr = loopFileName(num)
		out = append(out, st)
	}
	return out, nil
}

// loopFileName reads lo_file_name of a bound device. The kernel stats the
// backing file to answer, so a device on a dead FUSE file answers ENOTCONN.
func loopFileName(num int) (string, error) {
	f, err := os.OpenFile(loopPath(num), os.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return "", err
	}
	name := info.File_name[:]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return string(name), nil
}

// clearLoop unbinds a device this process did not bind (a stale one). If it
// is still open (mounted), the kernel only marks it autoclear and unbinds it
// at the last close, which is what we want for a filesystem still mounted on
// a dead backend.
func clearLoop(num int) error {
	f, err := os.OpenFile(loopPath(num), os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", loopPath(num), err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("LOOP_CLR_FD %s: %w", loopPath(num), err)
	}
	return nil
}

func readSysfsString(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// loopAvailable says what is missing for loop devices on this node.
func loopAvailable() error {
	if _, err := os.Stat(loopControlPath); err != nil {
		return fmt.Errorf("%w: %s: %v (load the loop module or mount the host /dev into the plugin)", nbdattach.ErrUnavailable, loopControlPath, err)
	}
	return nil
}
