package fuse

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fs"
	gofuse "github.com/hanwen/go-fuse/v2/fuse"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// ringTest drives one ring entry's request handling as the kernel would:
// it fills the entry's header and payload, calls handle, and reads the
// reply back. No kernel: these are the entry's own checks of what it is
// given.
type ringTest struct {
	t      *testing.T
	e      *uringEntry
	unique uint64
}

// sparseRaw is a new raw file of size bytes, none of them allocated.
func sparseRaw(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// sparseBackend is sparseRaw open as a Backend until the test ends.
func sparseBackend(t *testing.T, size int64) *nbdattach.FileBackend {
	t.Helper()
	b, err := nbdattach.OpenFile(sparseRaw(t, size), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func newRingTest(t *testing.T, size int64) (*ringTest, *diskNode) {
	b := sparseBackend(t, size)
	root := &fuseRoot{}
	raw := fs.NewNodeFS(root, &fs.Options{})
	disk := &diskNode{b: b, id: "disk"}
	disk.size.Store(size)
	if err := root.add("disk", disk); err != nil {
		t.Fatal(err)
	}
	e := &uringEntry{
		srv:     &uringServer{fs: raw, cancel: make(chan struct{})},
		hdr:     make([]byte, os.Getpagesize()),
		payload: make([]byte, fuseMaxWrite),
	}
	return &ringTest{t: t, e: e}, disk
}

// opIn is the part of a go-fuse input type the kernel puts in op_in: all
// of it after the InHeader.
func opIn[T any](v *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))[inHeaderSize:]
}

// call sends one request and returns the reply's error and arguments.
func (r *ringTest) call(opcode uint32, node uint64, op []byte, payload []byte, payloadSz int) (int32, []byte) {
	r.t.Helper()
	e := r.e
	clear(e.hdr[:uringHeaderLen])
	r.unique += 2
	h := (*gofuse.InHeader)(unsafe.Pointer(&e.hdr[uringInOutOff]))
	h.Opcode, h.Unique, h.NodeId = opcode, r.unique, node
	copy(e.hdr[uringOpInOff:uringOpInOff+uringOpInSize], op)
	copy(e.payload, payload)
	*(*uint64)(unsafe.Pointer(&e.hdr[uringEntOff+8])) = r.unique + 1000
	*(*uint32)(unsafe.Pointer(&e.hdr[uringEntOff+16])) = uint32(payloadSz)
	if got := e.handle(); got != r.unique+1000 {
		r.t.Fatalf("opcode %d: commit id %d, want %d", opcode, got, r.unique+1000)
	}
	errno := *(*int32)(unsafe.Pointer(&e.hdr[uringInOutOff+4]))
	if u := *(*uint64)(unsafe.Pointer(&e.hdr[uringInOutOff+8])); u != r.unique {
		r.t.Fatalf("opcode %d: reply unique %d, want %d", opcode, u, r.unique)
	}
	n := int(*(*uint32)(unsafe.Pointer(&e.hdr[uringEntOff+16])))
	if errno > 0 || errno < -4095 {
		r.t.Fatalf("opcode %d: reply error %d is not a negative errno", opcode, errno)
	}
	if n > len(e.payload) || errno != 0 && n != 0 {
		r.t.Fatalf("opcode %d: reply of %d bytes with error %d", opcode, n, errno)
	}
	return errno, e.payload[:n]
}

func TestUringEntryRequests(t *testing.T) {
	r, disk := newRingTest(t, 1<<20)
	cstr := func(s string) []byte { return append([]byte(s), 0) }

	errno, out := r.call(opLookup, gofuse.FUSE_ROOT_ID, nil, cstr("disk"), 5)
	if errno != 0 || len(out) != int(unsafe.Sizeof(gofuse.EntryOut{})) {
		t.Fatalf("lookup: error %d, %d bytes", errno, len(out))
	}
	entry := *(*gofuse.EntryOut)(unsafe.Pointer(&out[0]))
	if entry.NodeId == 0 || entry.Attr.Size != 1<<20 {
		t.Fatalf("lookup: node %d size %d", entry.NodeId, entry.Attr.Size)
	}
	if errno, _ := r.call(opLookup, gofuse.FUSE_ROOT_ID, nil, cstr("nothere"), 8); errno != -int32(syscall.ENOENT) {
		t.Fatalf("lookup of a missing name: %d, want ENOENT", errno)
	}
	open := gofuse.OpenIn{Flags: uint32(os.O_RDWR)}
	errno, out = r.call(opOpen, entry.NodeId, opIn(&open), nil, 0)
	if errno != 0 {
		t.Fatalf("open: %d", errno)
	}
	fh := (*gofuse.OpenOut)(unsafe.Pointer(&out[0])).Fh

	data := []byte("written over the ring")
	w := gofuse.WriteIn{Fh: fh, Offset: 8192, Size: uint32(len(data))}
	errno, out = r.call(opWrite, entry.NodeId, opIn(&w), data, len(data))
	if errno != 0 || (*gofuse.WriteOut)(unsafe.Pointer(&out[0])).Size != uint32(len(data)) {
		t.Fatalf("write: error %d", errno)
	}
	got := make([]byte, len(data))
	if err := disk.b.ReadAt(t.Context(), got, 8192); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("backend holds %q (%v), want %q", got, err, data)
	}
	rd := gofuse.ReadIn{Fh: fh, Offset: 8192, Size: uint32(len(data))}
	if errno, out = r.call(opRead, entry.NodeId, opIn(&rd), nil, 0); errno != 0 || !bytes.Equal(out, data) {
		t.Fatalf("read: error %d, %q", errno, out)
	}
	// Past the end: nothing, not an error (the file never grows).
	rd.Offset = 1 << 20
	if errno, out = r.call(opRead, entry.NodeId, opIn(&rd), nil, 0); errno != 0 || len(out) != 0 {
		t.Fatalf("read past the end: error %d, %d bytes", errno, len(out))
	}
	fsync := gofuse.FsyncIn{Fh: fh}
	if errno, _ = r.call(opFsync, entry.NodeId, opIn(&fsync), nil, 0); errno != 0 {
		t.Fatalf("fsync: %d", errno)
	}
	fa := gofuse.FallocateIn{Fh: fh, Offset: 8192, Length: 4096, Mode: 0x01 | 0x02} // KEEP_SIZE|PUNCH_HOLE
	if errno, _ = r.call(opFallocate, entry.NodeId, opIn(&fa), nil, 0); errno != 0 {
		t.Fatalf("punch hole: %d", errno)
	}
	if err := disk.b.ReadAt(t.Context(), got, 8192); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatalf("punched range holds %q (%v)", got, err)
	}
	if errno, out = r.call(opStatfs, entry.NodeId, nil, nil, 0); errno != 0 || len(out) != int(unsafe.Sizeof(gofuse.StatfsOut{})) {
		t.Fatalf("statfs: error %d, %d bytes", errno, len(out))
	}

	// What the kernel never sends, answered with an error and no reply
	// arguments, and nothing reaches the backend.
	w.Size = uint32(len(data)) + 1
	if errno, _ = r.call(opWrite, entry.NodeId, opIn(&w), data, len(data)); errno != -int32(syscall.EINVAL) {
		t.Fatalf("write whose size is not its payload's: %d, want EINVAL", errno)
	}
	rd.Offset, rd.Size = 0, fuseMaxWrite+1
	if errno, _ = r.call(opRead, entry.NodeId, opIn(&rd), nil, 0); errno != -int32(syscall.EINVAL) {
		t.Fatalf("read larger than the payload buffer: %d, want EINVAL", errno)
	}
	if errno, _ = r.call(opLookup, gofuse.FUSE_ROOT_ID, nil, []byte("disk"), 4); errno != -int32(syscall.EINVAL) {
		t.Fatalf("lookup of a name without its NUL: %d, want EINVAL", errno)
	}
	if errno, _ = r.call(opWrite, entry.NodeId, opIn(&w), nil, fuseMaxWrite+1); errno != -int32(syscall.EINVAL) {
		t.Fatalf("payload size beyond the buffer: %d, want EINVAL", errno)
	}
	if errno, _ = r.call(9999, entry.NodeId, nil, nil, 0); errno != -int32(syscall.ENOSYS) {
		t.Fatalf("unknown opcode: %d, want ENOSYS", errno)
	}
	if err := disk.b.ReadAt(t.Context(), got, 8192); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatalf("a refused write reached the backend: %q (%v)", got, err)
	}

	// The poll probe, answered without the filesystem.
	if errno, out = r.call(opLookup, gofuse.FUSE_ROOT_ID, nil, cstr(pollProbeName), len(pollProbeName)+1); errno != 0 || (*gofuse.EntryOut)(unsafe.Pointer(&out[0])).NodeId != pollProbeInode {
		t.Fatalf("poll probe lookup: %d", errno)
	}
	if errno, _ = r.call(opPoll, pollProbeInode, nil, nil, 0); errno != -int32(syscall.ENOSYS) {
		t.Fatalf("poll probe poll: %d, want ENOSYS", errno)
	}
}

// Requests with every field the ring carries drawn at random (opcode,
// lengths, sizes, offsets, names) on a real node and handle: every one is
// answered with a negative errno or a reply that fits the payload, and none
// panics.
func TestUringEntryRandomRequests(t *testing.T) {
	r, _ := newRingTest(t, 1<<20)
	errno, out := r.call(opLookup, gofuse.FUSE_ROOT_ID, nil, []byte("disk\x00"), 5)
	if errno != 0 {
		t.Fatalf("lookup: %d", errno)
	}
	node := (*gofuse.EntryOut)(unsafe.Pointer(&out[0])).NodeId
	open := gofuse.OpenIn{Flags: uint32(os.O_RDWR)}
	if errno, out = r.call(opOpen, node, opIn(&open), nil, 0); errno != 0 {
		t.Fatalf("open: %d", errno)
	}
	fh := (*gofuse.OpenOut)(unsafe.Pointer(&out[0])).Fh
	rng := rand.New(rand.NewPCG(1, 2))
	ops := []uint32{opLookup, opGetattr, opRead, opWrite, opStatfs, opFsync, opFlush, opAccess, opFallocate, opPoll, 0, 2, 26, 41, 52, 9999}
	payload := make([]byte, 64<<10)
	for i := 0; i < 5000; i++ {
		op := ops[rng.IntN(len(ops))]
		var in [uringOpInSize]byte
		for j := range in {
			in[j] = byte(rng.Uint32())
		}
		// The handle is one the kernel was given (go-fuse trusts the
		// kernel with those), at its place in the op's header; offsets
		// and sizes are inside or around the file, or beyond anything.
		switch op {
		case opGetattr:
			*(*uint64)(unsafe.Pointer(&in[8])) = fh
		default:
			*(*uint64)(unsafe.Pointer(&in[0])) = fh
			*(*uint64)(unsafe.Pointer(&in[8])) = uint64(rng.Int64N(2 << 20))
			*(*uint32)(unsafe.Pointer(&in[16])) = uint32(rng.IntN(2 * fuseMaxWrite))
		}
		if op == opFallocate {
			*(*uint32)(unsafe.Pointer(&in[24])) &= 0x1f
		}
		for j := range payload[:256] {
			payload[j] = byte(rng.Uint32())
		}
		n := rng.IntN(len(payload))
		if rng.IntN(20) == 0 {
			n = fuseMaxWrite + rng.IntN(100)
		}
		r.call(op, node, in[:], payload, n)
	}
	if p := r.e.srv.panics.Load(); p != 0 {
		t.Fatalf("%d requests panicked in the filesystem", p)
	}
}
