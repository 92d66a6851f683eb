package qcow2

import (
	"bytes"
	"fmt"
	"path/filepath"
	"testing"
)

// qemuIOWorkload is a fixed mix of qemu-io operations covering plain,
// partial, zero, compressed and discarded clusters.
func qemuIOWorkload(size, cs int64, compress bool) []string {
	var ops []string
	add := func(format string, args ...any) { ops = append(ops, "-c", fmt.Sprintf(format, args...)) }
	if compress {
		// Compressed writes only go to unallocated clusters: do them first.
		add("write -c -P 0x55 %d %d", alignDown(size*3/4, cs), cs)
		add("write -c -P 0x66 %d %d", 0, cs)
		if alignDown(size/2, cs) != alignDown(size*3/4, cs) {
			add("write -c -P 0x67 %d %d", alignDown(size/2, cs), cs)
		}
	}
	add("write -P 0x11 0 %d", size/4)
	add("write -P 0x22 %d 4096", size/3)
	add("write -P 0x33 %d 1000", size/2+7)
	add("write -z %d %d", size/8, size/8)
	add("discard %d %d", size/16, size/16)
	add("write -P 0x44 %d %d", size-8192, 8192)
	return ops
}

// TestReadQemuImages reads images made by qemu-img/qemu-io with every
// creation option and compares contents with qemu-img convert and our
// BlockStatus with qemu-img map.
func TestReadQemuImages(t *testing.T) {
	type tc struct {
		name     string
		opts     string
		size     int64
		cs       int64
		compress bool
		extra    func(t *testing.T, dir, path string)
	}
	var cases []tc
	for _, cs := range []int64{512, 4096, 65536, 2 << 20} {
		cases = append(cases, tc{name: fmt.Sprint("cluster_", cs), opts: fmt.Sprint("cluster_size=", cs), cs: cs, size: 5<<20 + 512, compress: true})
	}
	for _, rb := range []int{1, 2, 4, 8, 16, 32, 64} {
		cases = append(cases, tc{name: fmt.Sprintf("refcount_bits_%d", rb), opts: fmt.Sprintf("refcount_bits=%d", rb), size: 3 << 20, compress: true})
	}
	cases = append(cases,
		tc{name: "compat_0.10", opts: "compat=0.10", size: 3 << 20, compress: true},
		tc{name: "zstd", opts: "compression_type=zstd", size: 3 << 20, compress: true},
		tc{name: "extended_l2", opts: "extended_l2=on", size: 3<<20 + 4096, compress: true},
		tc{name: "extended_l2_32k", opts: "extended_l2=on,cluster_size=32k", size: 3 << 20, compress: true},
		tc{name: "prealloc_metadata", opts: "preallocation=metadata", size: 3 << 20},
		tc{name: "prealloc_falloc", opts: "preallocation=falloc", size: 3 << 20},
		tc{name: "prealloc_full", opts: "preallocation=full", size: 3 << 20},
		tc{name: "lazy_refcounts", opts: "lazy_refcounts=on", size: 3 << 20, compress: true},
		tc{name: "odd_size", opts: "cluster_size=4k", size: 3<<20 + 1234*512},
		tc{name: "snapshots", opts: "", size: 3 << 20, compress: true, extra: func(t *testing.T, dir, p string) {
			qemu(t, "qemu-img", "snapshot", "-c", "s1", p)
			qemu(t, "qemu-io", "-c", "write -P 0x77 0 128k", p)
			qemu(t, "qemu-img", "snapshot", "-c", "s2", p)
			qemu(t, "qemu-io", "-c", "write -P 0x78 64k 128k", p)
		}},
		tc{name: "bitmaps", opts: "", size: 3 << 20, extra: func(t *testing.T, dir, p string) {
			qemu(t, "qemu-img", "bitmap", "--add", p, "b0")
			qemu(t, "qemu-img", "bitmap", "--add", "-g", "128k", p, "b1")
		}},
		tc{name: "backing_qcow2_chain", opts: "", size: 3 << 20, extra: func(t *testing.T, dir, p string) {}},
	)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			qemu(t, "qemu-img", append(args, p, fmt.Sprint(c.size))...)
			qemu(t, "qemu-io", append(qemuIOWorkload(c.size, max(c.cs, 65536), c.compress), p)...)
			if c.extra != nil {
				c.extra(t, dir, p)
			}
			if !bytes.Equal(qemuRaw(t, p), ourRaw(t, p)) {
				t.Fatal("guest data differs from qemu-img convert")
			}
			if q, o := qemuMap(t, p), ourMap(t, p); !sameMap(q, o) {
				t.Fatalf("map differs\nqemu %v\nours %v", q, o)
			}
		})
	}
}

// TestReadBackingChains covers qcow2 and raw backing files, relative names
// resolved against the overlay's directory, backing files shorter than the
// overlay, and three-level chains.
func TestReadBackingChains(t *testing.T) {
	dir := t.TempDir()
	sub := filepath.Join(dir, "sub")
	qemu(t, "qemu-img", "create", "-q", "-f", "raw", filepath.Join(dir, "base.raw"), "2M")
	qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xa1 0 1536k", filepath.Join(dir, "base.raw"))
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw", filepath.Join(dir, "mid.qcow2"), "3M")
	qemu(t, "qemu-io", "-c", "write -P 0xb2 1M 1M", "-c", "write -z 64k 64k", filepath.Join(dir, "mid.qcow2"))
	mkdir(t, sub)
	top := filepath.Join(sub, "top.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", top, "4M")
	qemu(t, "qemu-io", "-c", "write -P 0xc3 512k 100k", "-c", "write -z 1536k 64k", top)
	extl2 := filepath.Join(dir, "extl2.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2", extl2, "4M")
	qemu(t, "qemu-io", "-c", "write -P 0xd4 1000 3000", "-c", "write -P 0xd5 70000 100000", "-c", "write -z 300k 4k", extl2)
	for _, p := range []string{filepath.Join(dir, "mid.qcow2"), top, extl2} {
		t.Run(filepath.Base(p), func(t *testing.T) {
			if !bytes.Equal(qemuRaw(t, p), ourRaw(t, p)) {
				t.Fatal("guest data differs from qemu-img convert")
			}
			if q, o := qemuMap(t, p), ourMap(t, p); !sameMap(q, o) {
				t.Fatalf("map differs\nqemu %v\nours %v", q, o)
			}
		})
	}
}
