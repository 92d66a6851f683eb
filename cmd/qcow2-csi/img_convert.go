package main

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"golang.org/x/sys/unix"
)

func init() {
	registerImgCommand(imgCommand{
		name:  "convert",
		usage: "convert [-c] [-f fmt] [-O output_fmt] [-o options] [-S sparse_size] [-t cache] [-m num_coroutines] [-W] [-n] [-U] [-p] [-q] filename output_filename",
		run:   runImgConvert,
	})
}

// convertTarget is the output image.
type convertTarget interface {
	WriteAt(p []byte, off int64) (int, error)
	Close() error
}

type rawTarget struct {
	f    *os.File
	sync bool
}

func (r rawTarget) WriteAt(p []byte, off int64) (int, error) { return r.f.WriteAt(p, off) }
func (r rawTarget) Close() error {
	var err error
	if r.sync {
		err = r.f.Sync()
	}
	if cerr := r.f.Close(); err == nil {
		err = cerr
	}
	return err
}

type convertJob struct {
	off, n int64
	zero   bool // the source reads as zeroes here
	seq    int64
}

type converter struct {
	src       imgFile
	dst       convertTarget
	qdst      *qcow2.Image // when the target is qcow2
	rawDst    *os.File     // when the target is raw
	compress  bool
	sparse    int64 // -S granularity; 0: write everything
	existing  bool  // -n: the target may hold old data
	unitSize  int64
	sync      bool // -t other than unsafe: make the target durable
	clusterSz int64
	firstErr  error
	// Reads run in parallel, writes in source order (qemu-img convert
	// without -W): parallel buffered writes to one file contend on its
	// inode lock and end up slower.
	orderMu   sync.Mutex
	orderCond *sync.Cond
	nextWrite int64
	errOnce   sync.Once
}

func runImgConvert(args []string) int {
	pa, err := parseArgs(args, argSpec{short: "hf:O:B:Cco:l:S:pt:T:qnm:WUr:", long: map[string]bool{"help": false, "force-share": false, "object": true, "image-opts": false, "target-image-opts": false, "salvage": false, "target-is-zero": false, "bitmaps": false, "skip-broken-bitmaps": false}})
	if err != nil {
		return imgErr("%v", err)
	}
	if pa.wantsHelp("convert") {
		return 0
	}
	for _, unsupported := range []string{"B", "C", "object", "image-opts", "target-image-opts", "salvage", "bitmaps", "r"} {
		if pa.has(unsupported) {
			name := "-" + unsupported
			if len(unsupported) > 1 {
				name = "-" + name
			}
			return imgErr("option %s is not supported by qcow2-csi img convert", name)
		}
	}
	if len(pa.pos) < 2 {
		return imgErr("Expecting image file name")
	}
	if len(pa.pos) > 2 {
		return imgErr("concatenating several source images is not supported")
	}
	outFmt, _ := pa.get("O")
	if outFmt == "" {
		outFmt = "raw"
	}
	if outFmt != "raw" && outFmt != "qcow2" {
		return imgErr("Unknown file format '%s' (supported: qcow2, raw)", outFmt)
	}
	c := &converter{compress: pa.has("c"), sparse: 4096, existing: pa.has("n"), unitSize: 2 << 20}
	// qemu-img convert writes its target with cache=unsafe unless -t says
	// otherwise: no fsync.
	switch t, _ := pa.get("t"); t {
	case "", "unsafe":
	case "writeback", "writethrough", "none", "directsync":
		c.sync = true
	default:
		return imgErr("Invalid cache option: %s", t)
	}
	if c.compress && outFmt != "qcow2" {
		return imgErr("Compression not supported for this file format")
	}
	if v, ok := pa.get("S"); ok {
		s, err := parseSize(v)
		if err != nil || s%512 != 0 {
			return imgErr("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512.")
		}
		c.sparse = s
	}
	workers := 8
	if v, ok := pa.get("m"); ok {
		if _, err := fmt.Sscan(v, &workers); err != nil || workers < 1 || workers > 16 {
			return imgErr("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
		}
	}
	cs := newCreateSettings()
	for _, o := range pa.all("o") {
		if err := applyCreateOptions(cs, o); err != nil {
			return imgErr("%v", err)
		}
	}
	if cs.help {
		fmt.Print(createOptionsHelp)
		return 0
	}
	if cs.opts.BackingFile != "" {
		return imgErr("backing_file is not supported by qcow2-csi img convert")
	}
	inFmt, _ := pa.get("f")
	share := pa.has("U") || pa.has("force-share")
	src, err := openImg(pa.pos[0], inFmt, false, share)
	if err != nil {
		return imgErr("%v", err)
	}
	if l, ok := pa.get("l"); ok {
		// -l: export one internal snapshot (img_snapshot.go).
		if src, err = openSnapshotSource(src, l); err != nil {
			return imgErr("%v", err)
		}
	}
	defer src.Close()
	c.src = src
	out := pa.pos[1]
	size := src.Size()
	if err := c.openTarget(out, outFmt, size, cs); err != nil {
		return imgErr("%v", err)
	}
	err = c.run(size, workers)
	if cerr := c.dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return imgErr("error while converting %s: %v", outFmt, err)
	}
	return 0
}

func (c *converter) openTarget(out, format string, size int64, cs *createSettings) error {
	switch {
	case format == "qcow2" && !c.existing:
		o := cs.opts
		o.Size = size
		o.NoSync = !c.sync
		img, err := qcow2.Create(out, o)
		if err != nil {
			return fmt.Errorf("%s: %s", out, trimQcow2(err))
		}
		c.qdst, c.dst = img, img
	case format == "qcow2":
		img, err := qcow2.Open(out, qcow2.OpenOptions{NoSync: !c.sync})
		if err != nil {
			return fmt.Errorf("Could not open '%s': %v", out, unwrapPathErr(err))
		}
		if img.Size() < size {
			img.Close()
			return fmt.Errorf("output file is smaller than input file")
		}
		c.qdst, c.dst = img, img
	default:
		if !c.existing {
			if err := createRaw(out, size, cs.opts.Preallocation); err != nil {
				return fmt.Errorf("%s: %v", out, err)
			}
		}
		f, err := os.OpenFile(out, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("Could not open '%s': %v", out, unwrapPathErr(err))
		}
		c.rawDst, c.dst = f, rawTarget{f, c.sync}
	}
	c.clusterSz = 512
	if c.qdst != nil {
		c.clusterSz = c.qdst.ClusterSize()
		c.unitSize = max(c.unitSize, c.clusterSz)
	}
	return nil
}

func (c *converter) fail(err error) {
	c.errOnce.Do(func() { c.firstErr = err })
}

// run walks the source's block status and hands data and zero ranges to
// workers; ranges that are zero in the source are skipped on a fresh
// target (it reads as zeroes already).
func (c *converter) run(size int64, workers int) error {
	jobs := make(chan convertJob, workers*2)
	c.orderCond = sync.NewCond(&c.orderMu)
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, c.unitSize)
			for j := range jobs {
				if c.firstErr == nil {
					if err := c.do(j, buf); err != nil {
						c.fail(err)
					}
				}
				c.waitTurn(j.seq) // no-op when do already took its turn
				c.orderMu.Lock()
				c.nextWrite = j.seq + 1
				c.orderCond.Broadcast()
				c.orderMu.Unlock()
			}
		}()
	}
	const statusChunk = 1 << 30
	var seq int64
	for off := int64(0); off < size && c.firstErr == nil; {
		n := min(int64(statusChunk), size-off)
		exts, err := c.src.BlockStatus(off, n)
		if err != nil {
			c.fail(err)
			break
		}
		for _, x := range exts {
			zero := x.Zero || !x.Present
			if zero && !c.existing {
				continue
			}
			// Units aligned to unitSize so compressed clusters stay whole.
			for p := x.Start; p < x.Start+x.Length; {
				end := min(x.Start+x.Length, (p/c.unitSize+1)*c.unitSize)
				jobs <- convertJob{off: p, n: end - p, zero: zero, seq: seq}
				seq++
				p = end
			}
		}
		if len(exts) == 0 {
			break
		}
		last := exts[len(exts)-1]
		off = last.Start + last.Length
	}
	close(jobs)
	wg.Wait()
	return c.firstErr
}

// waitTurn blocks until the jobs before seq have written.
func (c *converter) waitTurn(seq int64) {
	c.orderMu.Lock()
	for c.nextWrite < seq {
		c.orderCond.Wait()
	}
	c.orderMu.Unlock()
}

func (c *converter) do(j convertJob, buf []byte) error {
	if j.zero {
		c.waitTurn(j.seq)
		return c.writeZero(j.off, j.n)
	}
	b := buf[:j.n]
	if n, err := c.src.ReadAt(b, j.off); n != len(b) {
		return fmt.Errorf("read at %d: %w", j.off, err)
	}
	c.waitTurn(j.seq)
	if c.compress {
		return c.writeCompressed(b, j.off)
	}
	if c.sparse == 0 {
		_, err := c.dst.WriteAt(b, j.off)
		return err
	}
	// Write the non-zero runs, skip (or on -n, zero) the zero granules.
	g := c.sparse
	for p := int64(0); p < j.n; {
		q := min(j.n, alignNext(j.off+p, g)-j.off)
		isZero := allZero(b[p:q])
		r := q
		for r < j.n {
			s := min(j.n, r+g)
			if allZero(b[r:s]) != isZero {
				break
			}
			r = s
		}
		if isZero {
			if c.existing {
				if err := c.writeZero(j.off+p, r-p); err != nil {
					return err
				}
			}
		} else if _, err := c.dst.WriteAt(b[p:r], j.off+p); err != nil {
			return err
		}
		p = r
	}
	return nil
}

func (c *converter) writeCompressed(b []byte, off int64) error {
	cs := c.clusterSz
	for p := int64(0); p < int64(len(b)); p += cs {
		chunk := b[p:min(int64(len(b)), p+cs)]
		if allZero(chunk) {
			if c.existing {
				if err := c.writeZero(off+p, int64(len(chunk))); err != nil {
					return err
				}
			}
			continue
		}
		if _, err := c.qdst.WriteCompressed(chunk, off+p); err != nil {
			if errors.Is(err, qcow2.ErrInvalidOption) {
				// Already allocated (-n): store it uncompressed.
				_, err = c.qdst.WriteAt(chunk, off+p)
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

func (c *converter) writeZero(off, n int64) error {
	if c.qdst != nil {
		return c.qdst.WriteZeroes(off, n, qcow2.ZeroMayUnmap)
	}
	return unix.Fallocate(int(c.rawDst.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

func alignNext(x, a int64) int64 { return (x/a + 1) * a }

// allZero reports whether b is all zero bytes.
func allZero(b []byte) bool {
	for len(b) >= 8 && len(b)%8 != 0 {
		if b[len(b)-1] != 0 {
			return false
		}
		b = b[:len(b)-1]
	}
	for i := 0; i+8 <= len(b); i += 8 {
		if b[i]|b[i+1]|b[i+2]|b[i+3]|b[i+4]|b[i+5]|b[i+6]|b[i+7] != 0 {
			return false
		}
	}
	for _, x := range b[len(b)&^7:] {
		if x != 0 {
			return false
		}
	}
	return true
}
