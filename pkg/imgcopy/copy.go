package imgcopy

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Source is the disk Copy reads.
type Source interface {
	io.ReaderAt
	// BlockStatus describes [off, off+n) as extents, clipped to the disk.
	BlockStatus(off, n int64) ([]qcow2.Extent, error)
}

// Target is the disk Copy writes.
type Target interface {
	io.WriterAt
	// WriteZeroes makes [off, off+n) read as zeroes.
	WriteZeroes(off, n int64, flags qcow2.ZeroFlags) error
}

// compressedTarget is a Target that stores clusters compressed (a
// *qcow2.Image).
type compressedTarget interface {
	Target
	WriteCompressed(p []byte, off int64) (int, error)
	ClusterSize() int64
}

// Options tune Copy. The zero value copies every byte of data the source
// has, with one worker, into a fresh target.
type Options struct {
	// Workers is how many units are read at once (0 means 1). Writes stay
	// in source order whatever the number.
	Workers int
	// Sparse is the granularity, in bytes, at which data that reads as
	// zeroes is left unwritten (qemu-img convert -S); 0 writes data as read.
	Sparse int64
	// Existing says the target may hold old data: ranges that read as
	// zeroes are zeroed in it rather than skipped.
	Existing bool
	// Compress writes data clusters compressed; the target must be a
	// *qcow2.Image (or have its WriteCompressed and ClusterSize).
	Compress bool
}

// unitSize is what one job reads and writes at most; a larger target
// cluster raises it so that compressed clusters stay whole.
const unitSize = 2 << 20

// statusChunk bounds one block status query, and so the extents held at once.
const statusChunk = 1 << 30

// ErrNoCompression is returned when Options.Compress asks for a target that
// cannot store compressed clusters.
var ErrNoCompression = errors.New("imgcopy: target cannot store compressed clusters")

// Copy copies the first size bytes of src's disk into dst.
func Copy(dst Target, src Source, size int64, o Options) error {
	c := &copier{src: src, dst: dst, o: o, unit: unitSize, cluster: 512}
	if ct, ok := dst.(compressedTarget); ok {
		c.cdst = ct
		c.cluster = ct.ClusterSize()
		c.unit = max(c.unit, c.cluster)
	} else if o.Compress {
		return ErrNoCompression
	}
	c.order = sync.NewCond(&c.mu)
	return c.run(size, max(o.Workers, 1))
}

type job struct {
	off, n int64
	zero   bool // the source reads as zeroes here
	seq    int64
}

type copier struct {
	src     Source
	dst     Target
	cdst    compressedTarget // dst, when it stores compressed clusters
	o       Options
	unit    int64
	cluster int64

	mu        sync.Mutex
	order     *sync.Cond // signalled when nextWrite moves
	nextWrite int64      // sequence number of the job whose turn it is to write
	err       error      // the first failure; later jobs are skipped
}

func (c *copier) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

func (c *copier) failed() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// run walks the source's block status and hands units to the workers.
func (c *copier) run(size int64, workers int) error {
	jobs := make(chan job, workers*2)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, c.unit)
			for j := range jobs {
				if c.failed() == nil {
					if err := c.do(j, buf); err != nil {
						c.fail(err)
					}
				}
				c.waitTurn(j.seq) // no-op when do already took its turn
				c.mu.Lock()
				c.nextWrite = j.seq + 1
				c.order.Broadcast()
				c.mu.Unlock()
			}
		}()
	}
	var seq int64
	for off := int64(0); off < size && c.failed() == nil; {
		exts, err := c.src.BlockStatus(off, min(int64(statusChunk), size-off))
		if err != nil {
			c.fail(err)
			break
		}
		for _, x := range exts {
			zero := x.Zero || !x.Present
			if zero && !c.o.Existing {
				continue
			}
			for p := x.Start; p < x.Start+x.Length; {
				end := min(x.Start+x.Length, (p/c.unit+1)*c.unit)
				jobs <- job{off: p, n: end - p, zero: zero, seq: seq}
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
	return c.failed()
}

// waitTurn blocks until the jobs before seq have written.
func (c *copier) waitTurn(seq int64) {
	c.mu.Lock()
	for c.nextWrite < seq {
		c.order.Wait()
	}
	c.mu.Unlock()
}

func (c *copier) do(j job, buf []byte) error {
	if j.zero {
		c.waitTurn(j.seq)
		return c.writeZeroes(j.off, j.n)
	}
	b := buf[:j.n]
	if n, err := c.src.ReadAt(b, j.off); n != len(b) {
		return fmt.Errorf("read at %d: %w", j.off, err)
	}
	c.waitTurn(j.seq)
	if c.o.Compress {
		return c.writeCompressed(b, j.off)
	}
	if c.o.Sparse == 0 {
		return c.write(b, j.off)
	}
	// Write the non-zero runs, skip (or on an existing target, zero) the
	// zero granules.
	g := c.o.Sparse
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
		var err error
		switch {
		case !isZero:
			err = c.write(b[p:r], j.off+p)
		case c.o.Existing:
			err = c.writeZeroes(j.off+p, r-p)
		}
		if err != nil {
			return err
		}
		p = r
	}
	return nil
}

func (c *copier) write(b []byte, off int64) error {
	if _, err := c.dst.WriteAt(b, off); err != nil {
		return fmt.Errorf("write at %d: %w", off, err)
	}
	return nil
}

func (c *copier) writeCompressed(b []byte, off int64) error {
	cs := c.cluster
	for p := int64(0); p < int64(len(b)); p += cs {
		chunk := b[p:min(int64(len(b)), p+cs)]
		if allZero(chunk) {
			if c.o.Existing {
				if err := c.writeZeroes(off+p, int64(len(chunk))); err != nil {
					return err
				}
			}
			continue
		}
		if _, err := c.cdst.WriteCompressed(chunk, off+p); err != nil {
			if !errors.Is(err, qcow2.ErrInvalidOption) {
				return err
			}
			// Already allocated (an existing target): store it as is.
			if err := c.write(chunk, off+p); err != nil {
				return err
			}
		}
	}
	return nil
}

func (c *copier) writeZeroes(off, n int64) error {
	return c.dst.WriteZeroes(off, n, qcow2.ZeroMayUnmap)
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

// FileTarget makes a raw image file a Target: zeroes are holes punched into
// it, so the file stays sparse.
type FileTarget struct{ *os.File }

// WriteZeroes punches [off, off+n) out of the file, keeping its size.
func (t FileTarget) WriteZeroes(off, n int64, _ qcow2.ZeroFlags) error {
	if err := unix.Fallocate(int(t.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return fmt.Errorf("punch hole at %d: %w", off, err)
	}
	return nil
}
