// Package attachcases is the one table of block-device cases every attach
// backend runs: the fuse backend on the host, the nbd backend in the VM. A
// backend's test supplies an nbdattach.Attacher (and the image formats it
// wants to cover) and calls Run; each case attaches images, makes and mounts
// filesystems with the real mkfs tools and the real kernel, drives I/O with
// fio --verify, and checks the image afterwards with the format's own oracle
// (qemu-img for qcow2).
//
// Cases need root, a kernel with ext4 and xfs, and the programs they name
// (peer.Require): under CI=true a missing one fails.
package attachcases

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// Image is an opened image: the Backend the attacher serves, and Close,
// which makes everything written durable and consistent on disk (a qcow2
// image's metadata) so that an oracle can read the file afterwards.
type Image interface {
	nbdattach.Backend
	Close() error
}

// Format is one kind of image file the cases run on.
type Format struct {
	// Name is qemu-img's name for the format ("raw", "qcow2").
	Name string
	// Create makes a new image of size bytes at path and opens it.
	Create func(path string, size int64) (Image, error)
	// Open opens an existing image.
	Open func(path string) (Image, error)
	// Grow enlarges an opened image to size bytes (online resize); nil, or
	// an error wrapping errors.ErrUnsupported, when the format cannot.
	Grow func(img Image, size int64) error
	// Allocated is the number of bytes of [off, off+length) of the virtual
	// disk that are allocated (hold data) in the closed image file at path.
	Allocated func(t *testing.T, path string, off, length int64) int64
	// Check fails the test when the closed image at path is inconsistent
	// (nil: the format has nothing to check).
	Check func(t *testing.T, path string)
	// Equal fails the test unless the closed image at path has exactly the
	// contents of the raw file ref.
	Equal func(t *testing.T, path, ref string)
}

// Target is what a backend's test supplies.
type Target struct {
	// Attacher is the backend under test.
	Attacher nbdattach.Attacher
	// Formats to run every case on; nil means Raw only.
	Formats []Format
	// Filesystems to run the filesystem cases on; nil means ext4 and xfs.
	Filesystems []string
	// Size of each image; 0 means 320 MiB (xfs wants at least 300 MiB).
	Size int64
	// IOSize is how much data the filesystem cases write (fio's file, the
	// file deleted and trimmed; the known file is half of it); 0 means
	// 32 MiB. A guest under TCG uses less: every byte costs there.
	IOSize int64
	// Options for every attach.
	Options nbdattach.AttachOptions
	// NoWriteZeroes, when not empty, says why the devices this backend
	// makes have no write-zeroes operation (Linux 6.1's nbd driver never
	// sends NBD_CMD_WRITE_ZEROES). The cases then expect what the kernel
	// does with such a device instead of skipping: its sysfs
	// write_zeroes_max_bytes is 0, fallocate punch-hole on it fails with
	// EOPNOTSUPP (the kernel will not fall back to writing zeroes there),
	// and BLKZEROOUT and zero-range still read back zeroes (written as
	// zero-filled WRITEs). Empty: write-zeroes must be advertised and
	// punch-hole must zero.
	NoWriteZeroes string
}

// Case is one entry of the table.
type Case struct {
	Name string
	// FS: the case runs once per filesystem; otherwise once per format only.
	FS  bool
	Run func(t *testing.T, e *Env)
}

// Cases is the table. Each case creates its own images in a temporary
// directory and detaches everything it attached, even when it fails.
var Cases = []Case{
	{Name: "fio-verify-reattach", FS: true, Run: caseFioVerify},
	{Name: "discard-frees", FS: true, Run: caseDiscard},
	{Name: "resize-online", FS: true, Run: caseResize},
	{Name: "zeroes-and-discard-blocks", Run: caseBlockZeroes},
	{Name: "read-only", Run: caseReadOnly},
}

// Run runs every case for every format (and filesystem) as subtests.
func Run(t *testing.T, tg Target) {
	peer.Root(t)
	if err := tg.Attacher.Available(); err != nil {
		peer.Missing(t, "attach backend "+tg.Attacher.Name(), err.Error())
	}
	if tg.Formats == nil {
		tg.Formats = []Format{Raw}
	}
	if tg.Filesystems == nil {
		tg.Filesystems = []string{"ext4", "xfs"}
	}
	if tg.Size == 0 {
		tg.Size = 320 << 20
	}
	if tg.IOSize == 0 {
		tg.IOSize = 32 << 20
	}
	for _, f := range tg.Formats {
		for _, c := range Cases {
			fss := []string{""}
			if c.FS {
				fss = tg.Filesystems
			}
			for _, fsType := range fss {
				name := f.Name + "/" + c.Name
				if fsType != "" {
					name += "/" + fsType
				}
				t.Run(name, func(t *testing.T) {
					e := &Env{T: t, Target: tg, Format: f, FS: fsType, Dir: t.TempDir()}
					c.Run(t, e)
				})
			}
		}
	}
}

// Env is one case's world: its target, format, filesystem and scratch dir.
type Env struct {
	T      *testing.T
	Target Target
	Format Format
	FS     string
	Dir    string
	n      int
}

// Attached is an image attached as a device.
type Attached struct {
	e      *Env
	Path   string // image file
	Img    Image
	Dev    nbdattach.Device
	Mnt    string // mountpoint when mounted
	closed bool
}

// NewImage creates an image in the case's directory and attaches it.
func (e *Env) NewImage(size int64) *Attached {
	t := e.T
	t.Helper()
	e.n++
	path := filepath.Join(e.Dir, fmt.Sprintf("img%d.%s", e.n, e.Format.Name))
	img, err := e.Format.Create(path, size)
	if err != nil {
		t.Fatalf("create %s image: %v", e.Format.Name, err)
	}
	return e.attach(path, img, e.Target.Options)
}

// Reopen opens the (closed) image again and attaches it.
func (e *Env) Reopen(path string, opts nbdattach.AttachOptions) *Attached {
	t := e.T
	t.Helper()
	img, err := e.Format.Open(path)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	return e.attach(path, img, opts)
}

func (e *Env) attach(path string, img Image, opts nbdattach.AttachOptions) *Attached {
	t := e.T
	t.Helper()
	id := fmt.Sprintf("case-%d-%d", os.Getpid(), time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dev, err := e.Target.Attacher.Attach(ctx, id, img, opts)
	if err != nil {
		img.Close()
		t.Fatalf("attach %s: %v", path, err)
	}
	a := &Attached{e: e, Path: path, Img: img, Dev: dev}
	t.Cleanup(func() { a.teardown() })
	return a
}

// teardown undoes whatever is still set up, for failed cases.
func (a *Attached) teardown() {
	if a.Mnt != "" {
		_ = unix.Unmount(a.Mnt, 0)
		a.Mnt = ""
	}
	if !a.closed {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := a.Dev.Detach(ctx); err != nil {
			// The device still serves from the image (a mount somewhere
			// holds it): closing the image now would hand its last
			// requests a closed backend. Leave it open; the test fails.
			a.e.T.Errorf("cleanup: detach %s: %v (image left open)", a.Dev.Path(), err)
			return
		}
		a.Img.Close()
		a.closed = true
	}
}

// Mkfs makes the case's filesystem on the device.
func (a *Attached) Mkfs() {
	t := a.e.T
	t.Helper()
	switch a.e.FS {
	case "ext4":
		run(t, peer.Require(t, "mkfs.ext4"), "-F", "-q", a.Dev.Path())
	case "xfs":
		run(t, peer.Require(t, "mkfs.xfs"), "-f", "-q", a.Dev.Path())
	default:
		t.Fatalf("unknown filesystem %q", a.e.FS)
	}
}

// Mount mounts the device's filesystem on a fresh directory.
func (a *Attached) Mount(flags uintptr) string {
	t := a.e.T
	t.Helper()
	a.e.n++
	mnt := filepath.Join(a.e.Dir, fmt.Sprintf("mnt%d", a.e.n))
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(a.Dev.Path(), mnt, a.e.FS, flags, ""); err != nil {
		t.Fatalf("mount %s (%s) on %s: %v", a.Dev.Path(), a.e.FS, mnt, err)
	}
	a.Mnt = mnt
	return mnt
}

// Umount unmounts the filesystem.
func (a *Attached) Umount() {
	t := a.e.T
	t.Helper()
	if err := unix.Unmount(a.Mnt, 0); err != nil {
		t.Fatalf("umount %s: %v", a.Mnt, err)
	}
	a.Mnt = ""
}

// Detach detaches the device and closes the image.
func (a *Attached) Detach() {
	t := a.e.T
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := a.Dev.Detach(ctx); err != nil {
		t.Fatalf("detach %s: %v", a.Dev.Path(), err)
	}
	a.closed = true
	if err := a.Img.Close(); err != nil {
		t.Fatalf("close image %s: %v", a.Path, err)
	}
}

// detachAndCompare saves what the device reads, detaches it, and checks that
// the closed image passes the format's check and holds exactly that.
func (a *Attached) detachAndCompare(t *testing.T) {
	t.Helper()
	ref := a.SaveDevice()
	a.Detach()
	a.e.checkImage(t, a.Path)
	a.e.Format.Equal(t, a.Path, ref)
}

// checkImage runs the format's consistency check on the closed image at
// path, where the format has one.
func (e *Env) checkImage(t *testing.T, path string) {
	t.Helper()
	if e.Format.Check != nil {
		e.Format.Check(t, path)
	}
}

// SaveDevice copies the device's whole contents, as the kernel reads them, to
// a sparse raw file: the reference the image must equal after detach. GNU cp
// does the copy, out of this (possibly race-instrumented) process; where cp
// has no --sparse (busybox, in the VM) Go does.
func (a *Attached) SaveDevice() string {
	t := a.e.T
	t.Helper()
	ref := a.Path + ".ref.raw"
	cp, err := exec.LookPath("cp")
	if err != nil || exec.Command(cp, "--sparse=always", a.Dev.Path(), ref).Run() != nil {
		if err := copySparse(a.Dev.Path(), ref); err != nil {
			t.Fatalf("copy %s: %v", a.Dev.Path(), err)
		}
	}
	st, err := os.Stat(ref)
	if err != nil {
		t.Fatal(err)
	}
	if want := devSize(t, a.Dev.Path()); st.Size() != want {
		t.Fatalf("copied %d bytes from %s, its size is %d", st.Size(), a.Dev.Path(), want)
	}
	return ref
}

// copySparse copies src to a new file dst, leaving all-zero 64 KiB blocks
// as holes.
func copySparse(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	buf := make([]byte, 1<<20)
	var n int64
	for {
		m, rerr := io.ReadFull(in, buf)
		for off := 0; off < m; off += len(zeroBlock) {
			blk := buf[off:min(off+len(zeroBlock), m)]
			if !bytes.Equal(blk, zeroBlock[:len(blk)]) {
				if _, err := out.WriteAt(blk, n+int64(off)); err != nil {
					return err
				}
			}
		}
		n += int64(m)
		if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
			return out.Truncate(n)
		}
		if rerr != nil {
			return rerr
		}
	}
}

// zeroBlock is compared with bytes.Equal (assembly): a byte loop would crawl
// under the race detector.
var zeroBlock [64 << 10]byte

func devSize(t *testing.T, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var sz uint64
	if err := ioctlPtr(int(f.Fd()), unix.BLKGETSIZE64, &sz); err != nil {
		t.Fatalf("BLKGETSIZE64 %s: %v", dev, err)
	}
	return int64(sz)
}

// run runs a program and fails the test with its output when it fails.
func run(t *testing.T, prog string, args ...string) string {
	t.Helper()
	out, err := exec.Command(prog, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", prog, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// writeRandomFile writes n pseudo-random bytes (from seed) to path, fsyncs
// it, and returns their SHA-256.
func writeRandomFile(t *testing.T, path string, n int64, seed uint64) [32]byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	r := rand.NewChaCha8(key)
	buf := make([]byte, 1<<20)
	for left := n; left > 0; {
		m := min(left, int64(len(buf)))
		r.Read(buf[:m])
		if _, err := f.Write(buf[:m]); err != nil {
			t.Fatalf("write %s: %v", path, err)
		}
		h.Write(buf[:m])
		left -= m
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync %s: %v", path, err)
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

// fio runs fio with args and fails the test if it reports an error.
func fio(t *testing.T, args ...string) {
	t.Helper()
	fioBin := peer.Require(t, "fio")
	// No verify state files: fio would leave them in the working directory.
	out := run(t, fioBin, append([]string{"--output-format=terse", "--terse-version=3", "--verify_state_save=0"}, args...)...)
	// terse v3: field 5 is the error code of each job line.
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		fs := strings.Split(line, ";")
		if len(fs) < 5 || fs[0] != "3" {
			continue
		}
		if fs[4] != "0" {
			t.Fatalf("fio job %s reported error %s:\n%s", fs[2], fs[4], out)
		}
	}
}

// Case: make a filesystem, run fio with verification, write a known file,
// detach, attach the image again and find both intact; the image is
// consistent and equal to what the device showed.
func caseFioVerify(t *testing.T, e *Env) {
	a := e.NewImage(e.Target.Size)
	a.Mkfs()
	mnt := a.Mount(0)
	fioArgs := func(extra ...string) []string {
		return append([]string{"--name=verify", "--filename=" + filepath.Join(mnt, "fio.dat"),
			"--size=" + strconv.FormatInt(e.Target.IOSize, 10), "--bs=4k", "--rw=randwrite", "--direct=1", "--ioengine=libaio",
			"--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--randseed=4242"}, extra...)
	}
	fio(t, fioArgs("--do_verify=1")...)
	sum := writeRandomFile(t, filepath.Join(mnt, "known"), e.Target.IOSize/2, 7)
	a.Umount()
	a.detachAndCompare(t)

	b := e.Reopen(a.Path, e.Target.Options)
	mnt = b.Mount(0)
	fio(t, fioArgs("--verify_only")...)
	if got := fileSum(t, filepath.Join(mnt, "known")); got != sum {
		t.Fatalf("known file after reattach: sha256 %x, wrote %x", got, sum)
	}
	b.Umount()
	b.Detach()
	e.checkImage(t, a.Path)
}

// Case: data written and then deleted and trimmed is freed in the image file,
// as the format's oracle sees it: every byte of the device ranges the file
// occupied (FIEMAP) is allocated in the image before, and none is after.
func caseDiscard(t *testing.T, e *Env) {
	fileSize := e.Target.IOSize
	a := e.NewImage(e.Target.Size)
	a.Mkfs()
	mnt := a.Mount(0)
	writeRandomFile(t, filepath.Join(mnt, "big"), fileSize, 11)
	extents := fiemap(t, filepath.Join(mnt, "big"))
	var mapped int64
	for _, x := range extents {
		mapped += x[1]
	}
	if mapped != fileSize {
		t.Fatalf("FIEMAP maps %d bytes of the %d-byte file", mapped, fileSize)
	}
	a.Umount()
	a.Detach()
	allocated := func() (n int64) {
		for _, x := range extents {
			n += e.Format.Allocated(t, a.Path, x[0], x[1])
		}
		return n
	}
	if got := allocated(); got != fileSize {
		t.Fatalf("image allocates %d bytes of the file's %d before trim", got, fileSize)
	}

	b := e.Reopen(a.Path, e.Target.Options)
	mnt = b.Mount(0)
	if err := os.Remove(filepath.Join(mnt, "big")); err != nil {
		t.Fatal(err)
	}
	// xfs skips extents freed by a transaction whose log checkpoint has
	// not completed ("busy"), and sync(2) can return before that: a
	// remount settles the log, so the trim sees every freed block.
	b.Umount()
	mnt = b.Mount(0)
	fitrim(t, mnt)
	b.Umount()
	ref := b.SaveDevice()
	b.Detach()
	// The filesystem may reuse a few freed blocks for its own metadata in
	// the meantime; the file's data must be gone.
	if got := allocated(); got > 1<<20 {
		t.Fatalf("image still allocates %d bytes of the deleted file's %d after trim", got, fileSize)
	}
	e.checkImage(t, a.Path)
	e.Format.Equal(t, a.Path, ref)
}

// fiemap returns the physical (device) extents of a file as [offset, length]
// pairs, after syncing it.
func fiemap(t *testing.T, path string) [][2]int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const (
		fsIocFiemap     = 0xc020660b // _IOWR('f', 11, struct fiemap)
		fiemapFlagSync  = 1
		fiemapExtentLen = 56
		maxExtents      = 512
		fiemapLast      = 1
	)
	// struct fiemap: start, length u64; flags, mapped, count, reserved u32;
	// then struct fiemap_extent: logical, physical, length, 2 reserved u64;
	// flags, 3 reserved u32.
	buf := make([]uint64, (32+maxExtents*fiemapExtentLen)/8)
	buf[0], buf[1] = 0, ^uint64(0)
	buf[2] = fiemapFlagSync     // flags (low u32), mapped (high) = 0
	buf[3] = uint64(maxExtents) // extent_count (low u32)
	if err := ioctlPtr(int(f.Fd()), fsIocFiemap, &buf[0]); err != nil {
		t.Fatalf("FIEMAP %s: %v", path, err)
	}
	n := int(buf[2] >> 32)
	var out [][2]int64
	for i := range n {
		ext := buf[4+i*7:]
		out = append(out, [2]int64{int64(ext[1]), int64(ext[2])})
		if uint32(ext[5])&fiemapLast != 0 {
			return out
		}
	}
	t.Fatalf("FIEMAP %s: more than %d extents", path, maxExtents)
	return nil
}

// fitrim is fstrim(8): FITRIM on a mounted filesystem.
func fitrim(t *testing.T, mnt string) {
	t.Helper()
	f, err := os.Open(mnt)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// struct fstrim_range { start, len, minlen u64 }
	r := [3]uint64{0, ^uint64(0), 0}
	const fitrimIoctl = 0xc0185879 // _IOWR('X', 121, struct fstrim_range)
	if err := ioctlPtr(int(f.Fd()), fitrimIoctl, &r); err != nil {
		t.Fatalf("FITRIM %s: %v", mnt, err)
	}
}

// Case: grow the image, tell the device, grow the mounted filesystem, and
// find the new space usable.
func caseResize(t *testing.T, e *Env) {
	if e.Format.Grow == nil {
		t.Skipf("format %s cannot grow", e.Format.Name)
	}
	a := e.NewImage(e.Target.Size)
	a.Mkfs()
	mnt := a.Mount(0)
	// Double it: the case reads the whole grown device back, so the growth
	// scales with the target's size (small in the VM).
	newSize := 2 * e.Target.Size
	if err := e.Format.Grow(a.Img, newSize); errors.Is(err, errors.ErrUnsupported) {
		t.Skipf("SKIP (format cannot grow yet): %v", err)
	} else if err != nil {
		t.Fatalf("grow image: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := a.Dev.Resize(ctx, newSize); err != nil {
		t.Fatalf("resize device: %v", err)
	}
	if got := devSize(t, a.Dev.Path()); got != newSize {
		t.Fatalf("device size after resize %d, want %d", got, newSize)
	}
	switch e.FS {
	case "ext4":
		if !hasCapSysResource(t) {
			// ext4's online resize ioctl wants CAP_SYS_RESOURCE, which
			// some containers (this project's CI hosts) drop: grow it
			// offline then, the device resize is what this case checks.
			t.Logf("no CAP_SYS_RESOURCE: resizing ext4 offline")
			a.Umount()
			run(t, peer.Require(t, "e2fsck"), "-f", "-y", a.Dev.Path())
			run(t, peer.Require(t, "resize2fs"), a.Dev.Path())
			mnt = a.Mount(0)
			break
		}
		run(t, peer.Require(t, "resize2fs"), a.Dev.Path())
	case "xfs":
		run(t, peer.Require(t, "xfs_growfs"), mnt)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if total := int64(st.Blocks) * st.Bsize; total <= e.Target.Size {
		t.Fatalf("filesystem size %d after growing to %d, not above the old size %d", total, newSize, e.Target.Size)
	}
	// Use the new space: reserve a file larger than the whole old device
	// (fallocate: metadata only, fast) and write its last MiB.
	big := int64(st.Bavail)*st.Bsize - 32<<20
	if big <= e.Target.Size {
		t.Fatalf("only %d bytes free after growing to %d", big+32<<20, newSize)
	}
	f, err := os.OpenFile(filepath.Join(mnt, "big"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, big); err != nil {
		t.Fatalf("fallocate %d bytes: %v", big, err)
	}
	tail := bytes.Repeat([]byte("grown "), 1<<20/6)
	if _, err := f.WriteAt(tail, big-int64(len(tail))); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	a.Umount()
	a.detachAndCompare(t)
}

// Case: the three ways a block device is zeroed or discarded reach the image
// and read back as zeroes: BLKZEROOUT (write-zeroes, no unmap), fallocate
// punch-hole on the device (write-zeroes that may unmap) and BLKDISCARD.
func caseBlockZeroes(t *testing.T, e *Env) {
	const size = 64 << 20
	a := e.NewImage(size)
	f, err := os.OpenFile(a.Dev.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Fill the device with a pattern, 1 MiB at a time (aligned for O_DIRECT).
	buf := alignedBuf(1 << 20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatalf("write %s at %d: %v", a.Dev.Path(), off, err)
		}
	}
	fd := int(f.Fd())
	wzMax := readSysfs(t, a.Dev.Path(), "queue/write_zeroes_max_bytes")
	if e.Target.NoWriteZeroes != "" {
		t.Logf("%s: no write-zeroes (%s): punch-hole must fail with EOPNOTSUPP", e.Target.Attacher.Name(), e.Target.NoWriteZeroes)
		if wzMax != "0" {
			t.Fatalf("%s advertises write-zeroes (write_zeroes_max_bytes %s) but the target says it has none (%s): update the target",
				a.Dev.Path(), wzMax, e.Target.NoWriteZeroes)
		}
	} else if wzMax == "0" {
		t.Fatalf("%s has no write-zeroes (write_zeroes_max_bytes 0): punch-hole cannot reach the image", a.Dev.Path())
	}
	ops := []struct {
		name     string
		off, len int64
		do       func(off, length int64) error
		// needsWZ: the operation exists only on a device with
		// write-zeroes (no fallback to writing zero pages).
		needsWZ bool
	}{
		{"BLKZEROOUT", 1 << 20, 3 << 20, func(off, length int64) error {
			r := [2]uint64{uint64(off), uint64(length)}
			return ioctlPtr(fd, unix.BLKZEROOUT, &r)
		}, false},
		{"fallocate punch-hole", 8 << 20, 5<<20 + 4096, func(off, length int64) error {
			return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		}, true},
		{"fallocate zero-range", 20 << 20, 1 << 20, func(off, length int64) error {
			return unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		}, false},
		{"BLKDISCARD", 32 << 20, 16 << 20, func(off, length int64) error {
			r := [2]uint64{uint64(off), uint64(length)}
			return ioctlPtr(fd, unix.BLKDISCARD, &r)
		}, false},
	}
	// done are the operations that zeroed their range.
	var done []int
	for i, op := range ops {
		err := op.do(op.off, op.len)
		if op.needsWZ && e.Target.NoWriteZeroes != "" {
			if !errors.Is(err, unix.EOPNOTSUPP) {
				t.Fatalf("%s [%d,+%d) on %s without write-zeroes: %v, want EOPNOTSUPP", op.name, op.off, op.len, a.Dev.Path(), err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s [%d,+%d) on %s: %v", op.name, op.off, op.len, a.Dev.Path(), err)
		}
		done = append(done, i)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	// What the device reads must be the pattern outside the ranges and
	// zeroes inside them.
	want := make([]byte, size)
	for off := 0; off < size; off += len(buf) {
		copy(want[off:], buf)
	}
	for _, i := range done {
		clear(want[ops[i].off : ops[i].off+ops[i].len])
	}
	got := alignedBuf(size)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatalf("read back %s: %v", a.Dev.Path(), err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("device byte %d reads %#x, want %#x", i, got[i], want[i])
	}
	f.Close()
	a.detachAndCompare(t)
}

// Case: an image attached read-only refuses writes at the device.
func caseReadOnly(t *testing.T, e *Env) {
	const size = 16 << 20
	a := e.NewImage(size)
	f, err := os.OpenFile(a.Dev.Path(), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	a.Detach()

	opts := e.Target.Options
	opts.ReadOnly = true
	b := e.Reopen(a.Path, opts)
	if ro := readSysfs(t, b.Dev.Path(), "ro"); ro != "1" {
		t.Fatalf("%s: sysfs ro is %q, want 1", b.Dev.Path(), ro)
	}
	// The kernel lets a read-only block device be opened for writing and
	// refuses the write itself.
	if w, err := os.OpenFile(b.Dev.Path(), os.O_WRONLY, 0); err == nil {
		_, err = w.WriteAt(make([]byte, 4096), 0)
		w.Close()
		if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EROFS) {
			t.Fatalf("writing read-only device %s: %v, want EPERM", b.Dev.Path(), err)
		}
	} else if !errors.Is(err, unix.EROFS) && !errors.Is(err, unix.EACCES) {
		t.Fatalf("opening read-only device %s for writing: %v", b.Dev.Path(), err)
	}
	r, err := os.Open(b.Dev.Path())
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if _, err := r.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	r.Close()
	want := append(make([]byte, 4096), bytes.Repeat([]byte{0xa5}, 4096)...)
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("read-only device byte %d reads %#x, want %#x", i, got[i], want[i])
	}
	b.Detach()
}

// readSysfs reads /sys/class/block/<dev>/<attr>.
func readSysfs(t *testing.T, dev, attr string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(dev), attr))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// hasCapSysResource reports whether the process has CAP_SYS_RESOURCE in its
// effective set.
func hasCapSysResource(t *testing.T) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			var caps uint64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%x", &caps); err != nil {
				t.Fatalf("CapEff %q: %v", v, err)
			}
			return caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	t.Fatal("no CapEff in /proc/self/status")
	return false
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
