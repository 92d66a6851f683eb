package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The model-based test: random sequences of writes, snapshots, reverts,
// deletes, resizes, reopens and amends on one of our images, mirrored on
// plain byte slices (what raw files would hold). After every step the
// active disk reads back equal to its mirror and `qemu-img check` finds no
// error and no leak; every few steps, and at the end, every snapshot reads
// back equal to its mirror through OpenSnapshot; at the end qemu-img also
// exports every snapshot and the active disk, and they must match too.

type modelSnap struct {
	id, name string
	data     []byte
}

type modelConfig struct {
	name  string
	opts  CreateOptions
	steps int
	seed  int64
}

func TestSnapshotModel(t *testing.T) {
	configs := []modelConfig{
		{name: "v3-64k", opts: CreateOptions{Size: 2 << 20}, steps: 80, seed: 1},
		{name: "v3-4k-refcount4-lazy", opts: CreateOptions{Size: 1 << 20, ClusterSize: 4096, RefcountBits: 4, LazyRefcounts: true}, steps: 70, seed: 2},
		{name: "v2-64k", opts: CreateOptions{Size: 2 << 20, Version: 2}, steps: 60, seed: 3},
		{name: "v3-extl2-32k", opts: CreateOptions{Size: 1<<20 + 512, ClusterSize: 32768, ExtendedL2: true}, steps: 60, seed: 4},
	}
	// QCOW2_MODEL_SEED=N explores other sequences (and prints what ran).
	extra, _ := strconv.ParseInt(os.Getenv("QCOW2_MODEL_SEED"), 10, 64)
	for _, c := range configs {
		c.seed += extra * 100
		t.Run(c.name, func(t *testing.T) {
			runModel(t, c)
		})
	}
}

type model struct {
	t      *testing.T
	path   string
	img    *Image
	rng    *rand.Rand
	active []byte
	snaps  []modelSnap
	nextN  int
	cs     int64
	// maxSnaps keeps refcounts inside narrow refcount widths.
	maxSnaps int
}

func runModel(t *testing.T, c modelConfig) {
	dir := t.TempDir()
	m := &model{t: t, path: filepath.Join(dir, "m.qcow2"), rng: rand.New(rand.NewSource(c.seed)), maxSnaps: 6}
	img, err := Create(m.path, c.opts)
	if err != nil {
		t.Fatal(err)
	}
	m.img = img
	m.cs = img.ClusterSize()
	m.active = make([]byte, c.opts.Size)
	if c.opts.RefcountBits == 4 {
		m.maxSnaps = 5 // refcounts stay below 15 (snapshots + active + COW slack)
	}
	defer func() {
		if m.img != nil {
			m.img.Close()
		}
	}()
	ops := map[string]int{}
	defer func() { t.Logf("operations: %v", ops) }()
	for step := 0; step < c.steps; step++ {
		desc := m.step()
		ops[strings.Fields(desc)[0]]++
		if err := m.img.Flush(); err != nil {
			t.Fatalf("step %d (%s): Flush: %v", step, desc, err)
		}
		m.verifyActive(step, desc)
		if r, out := qemuCheck(t, m.path); r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
			t.Fatalf("step %d (%s): qemu-img check: %s", step, desc, out)
		}
		if step%10 == 9 {
			m.verifySnapshots(step, desc)
		}
	}
	m.verifySnapshots(c.steps, "end")
	if err := m.img.Close(); err != nil {
		t.Fatal(err)
	}
	m.img = nil
	// qemu's view of the same file.
	if got := qemuRaw(t, m.path); !bytes.Equal(got, m.active) {
		t.Fatalf("qemu-img convert of the active disk differs from the model (len %d vs %d)", len(got), len(m.active))
	}
	for _, s := range m.snaps {
		out := filepath.Join(dir, "snap.raw")
		qemu(t, "qemu-img", "convert", "-U", "-l", "snapshot.id="+s.id, "-O", "raw", m.path, out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		// qemu exports a snapshot at the image's current size (its
		// load_tmp switches the L1 table, not the size): compare what
		// both sizes cover.
		if len(got) != len(m.active) {
			t.Fatalf("qemu-img convert -l snapshot.id=%s: %d bytes, want the current size %d", s.id, len(got), len(m.active))
		}
		n := min(len(got), len(s.data))
		if i := firstDiffAt(got[:n], s.data[:n]); i >= 0 {
			t.Fatalf("qemu-img convert -l snapshot.id=%s differs from the model at byte %d", s.id, i)
		}
	}
}

func (m *model) fatalf(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf(format, args...)
}

// step performs one random operation on the image and the mirror and
// describes it.
func (m *model) step() string {
	r := m.rng.Intn(100)
	switch {
	case r < 37:
		return m.opWrite()
	case r < 41:
		return m.opZero()
	case r < 45:
		return m.opDiscard()
	case r < 57:
		return m.opCreate()
	case r < 65:
		return m.opRevert()
	case r < 73:
		return m.opDelete()
	case r < 85:
		return m.opResize()
	case r < 90:
		return m.opReopen()
	default:
		return m.opAmend()
	}
}

func (m *model) opWrite() string {
	size := int64(len(m.active))
	n := 1 + m.rng.Int63n(min(3*m.cs, size))
	off := m.rng.Int63n(size - n + 1)
	if m.rng.Intn(3) == 0 {
		off = alignDown(off, 512)
		n = max(512, alignDown(n, 512))
		if off+n > size {
			n = size - off
		}
	}
	p := make([]byte, n)
	m.rng.Read(p)
	if _, err := m.img.WriteAt(p, off); err != nil {
		m.fatalf("WriteAt(%d, %d): %v", off, n, err)
	}
	copy(m.active[off:], p)
	return fmt.Sprintf("write %d+%d", off, n)
}

// randRange picks a range of up to three clusters inside the disk.
func (m *model) randRange() (off, n int64) {
	size := int64(len(m.active))
	n = 1 + m.rng.Int63n(min(3*m.cs, size))
	off = m.rng.Int63n(size - n + 1)
	return off, n
}

func (m *model) opZero() string {
	off, n := m.randRange()
	var flags ZeroFlags
	if m.rng.Intn(2) == 0 {
		flags = ZeroMayUnmap
	}
	if err := m.img.WriteZeroes(off, n, flags); err != nil {
		m.fatalf("WriteZeroes(%d, %d): %v", off, n, err)
	}
	clear(m.active[off : off+n])
	return fmt.Sprintf("zero %d+%d", off, n)
}

func (m *model) opDiscard() string {
	off, n := m.randRange()
	if err := m.img.Discard(off, n); err != nil {
		m.fatalf("Discard(%d, %d): %v", off, n, err)
	}
	// Only whole clusters go (the last one counts as whole up to the end
	// of the disk); without a backing file they read as zeroes.
	size := int64(len(m.active))
	s, e := alignUp(off, m.cs), alignDown(off+n, m.cs)
	if off+n == size {
		e = size
	}
	if e > s {
		clear(m.active[s:e])
	}
	return fmt.Sprintf("discard %d+%d", off, n)
}

func (m *model) opCreate() string {
	if len(m.snaps) >= m.maxSnaps {
		return m.opDelete()
	}
	m.nextN++
	name := fmt.Sprintf("s%d", m.nextN)
	if len(m.snaps) > 0 && m.rng.Intn(5) == 0 {
		name = m.snaps[m.rng.Intn(len(m.snaps))].name // qemu allows duplicate names
	}
	info, err := m.img.CreateSnapshot(name)
	if err != nil {
		m.fatalf("CreateSnapshot(%q): %v", name, err)
	}
	if info.Name != name || info.DiskSize != uint64(len(m.active)) || info.VMStateSize != 0 || info.Icount != -1 {
		m.fatalf("CreateSnapshot(%q) = %+v", name, info)
	}
	m.snaps = append(m.snaps, modelSnap{id: info.ID, name: name, data: bytes.Clone(m.active)})
	return fmt.Sprintf("create %s (id %s)", name, info.ID)
}

func (m *model) opRevert() string {
	if len(m.snaps) == 0 {
		return m.opCreate()
	}
	s := m.snaps[m.rng.Intn(len(m.snaps))]
	err := m.img.RevertToSnapshot(s.id)
	if m.img.hdr.Version < 3 && len(s.data) != len(m.active) {
		// qemu cannot resize a v2 image with snapshots, so it cannot
		// apply a snapshot of another size either.
		if err == nil {
			m.fatalf("revert to %s across sizes on v2 succeeded", s.id)
		}
		return "revert refused (v2 size change)"
	}
	if err != nil {
		m.fatalf("RevertToSnapshot(%s): %v", s.id, err)
	}
	m.active = bytes.Clone(s.data)
	if got := m.img.Size(); got != int64(len(m.active)) {
		m.fatalf("after revert to %s: size %d, want %d", s.id, got, len(m.active))
	}
	return "revert " + s.id
}

func (m *model) opDelete() string {
	if len(m.snaps) == 0 {
		return m.opCreate()
	}
	i := m.rng.Intn(len(m.snaps))
	s := m.snaps[i]
	if err := m.img.DeleteSnapshot(s.id); err != nil {
		m.fatalf("DeleteSnapshot(%s): %v", s.id, err)
	}
	m.snaps = append(m.snaps[:i], m.snaps[i+1:]...)
	return "delete " + s.id
}

func (m *model) opResize() string {
	cur := int64(len(m.active))
	var n int64
	if m.rng.Intn(2) == 0 {
		n = cur + 512*(1+m.rng.Int63n(4096))
	} else {
		n = 512 * (1 + m.rng.Int63n(cur/512))
	}
	if n > 4<<20 {
		n = 4 << 20
	}
	err := m.img.Resize(n, ResizeOptions{Shrink: true})
	if m.img.hdr.Version < 3 && len(m.snaps) > 0 && n != cur {
		if !errors.Is(err, ErrUnsupported) {
			m.fatalf("Resize on v2 with snapshots: err %v, want ErrUnsupported", err)
		}
		return "resize refused (v2 with snapshots)"
	}
	if err != nil {
		m.fatalf("Resize(%d) from %d: %v", n, cur, err)
	}
	if n > cur {
		m.active = append(m.active, make([]byte, n-cur)...)
	} else {
		m.active = m.active[:n]
	}
	return fmt.Sprintf("resize %d -> %d", cur, n)
}

func (m *model) opReopen() string {
	if err := m.img.Close(); err != nil {
		m.fatalf("Close: %v", err)
	}
	img, err := Open(m.path, OpenOptions{})
	if err != nil {
		m.fatalf("reopen: %v", err)
	}
	m.img = img
	return "reopen"
}

func (m *model) opAmend() string {
	h := m.img.hdr
	switch m.rng.Intn(3) {
	case 0:
		if h.Version < 3 {
			if err := m.img.Amend(AmendOptions{Compat: "1.1"}); err != nil {
				m.fatalf("Amend compat=1.1: %v", err)
			}
			return "amend compat=1.1"
		}
		canDown := m.img.refBits == 16 && !m.img.extL2
		for _, s := range m.snaps {
			if len(s.data) != len(m.active) {
				canDown = false
			}
		}
		err := m.img.Amend(AmendOptions{Compat: "0.10"})
		if canDown != (err == nil) {
			m.fatalf("Amend compat=0.10: err %v, expected success %t", err, canDown)
		}
		if err != nil {
			return "amend compat=0.10 refused"
		}
		return "amend compat=0.10"
	case 1:
		if h.Version < 3 {
			return m.opWrite()
		}
		on := !m.img.lazyRefcounts()
		if err := m.img.Amend(AmendOptions{LazyRefcounts: &on}); err != nil {
			m.fatalf("Amend lazy_refcounts=%t: %v", on, err)
		}
		return fmt.Sprintf("amend lazy_refcounts=%t", on)
	default:
		if h.Version < 3 {
			return m.opWrite()
		}
		bits := []int{8, 16, 32}[m.rng.Intn(3)]
		if err := m.img.Amend(AmendOptions{RefcountBits: bits}); err != nil {
			m.fatalf("Amend refcount_bits=%d: %v", bits, err)
		}
		return fmt.Sprintf("amend refcount_bits=%d", bits)
	}
}

func (m *model) verifyActive(step int, desc string) {
	m.t.Helper()
	if got := m.img.Size(); got != int64(len(m.active)) {
		m.fatalf("step %d (%s): size %d, model %d", step, desc, got, len(m.active))
	}
	got := make([]byte, len(m.active))
	if _, err := m.img.ReadAt(got, 0); err != nil {
		m.fatalf("step %d (%s): ReadAt: %v", step, desc, err)
	}
	if i := firstDiffAt(got, m.active); i >= 0 {
		m.fatalf("step %d (%s): active disk differs from the model at byte %d", step, desc, i)
	}
}

func (m *model) verifySnapshots(step int, desc string) {
	m.t.Helper()
	list := m.img.Snapshots()
	if len(list) != len(m.snaps) {
		m.fatalf("step %d (%s): %d snapshots, model %d", step, desc, len(list), len(m.snaps))
	}
	for i, s := range m.snaps {
		if list[i].ID != s.id || list[i].Name != s.name || list[i].DiskSize != uint64(len(s.data)) {
			m.fatalf("step %d (%s): snapshot %d is %+v, model id %s name %s size %d", step, desc, i, list[i], s.id, s.name, len(s.data))
		}
		v, err := m.img.OpenSnapshot(s.id)
		if err != nil {
			m.fatalf("step %d (%s): OpenSnapshot(%s): %v", step, desc, s.id, err)
		}
		got := make([]byte, len(s.data))
		if _, err := v.ReadAt(got, 0); err != nil {
			m.fatalf("step %d (%s): snapshot %s ReadAt: %v", step, desc, s.id, err)
		}
		v.Close()
		if j := firstDiffAt(got, s.data); j >= 0 {
			m.fatalf("step %d (%s): snapshot %s differs from the model at byte %d", step, desc, s.id, j)
		}
	}
}

func firstDiffAt(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1 // fast path: bytes.Equal is not instrumented by -race
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}
