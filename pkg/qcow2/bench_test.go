package qcow2

import (
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// Benchmarks of the data path against the same operations on a plain file
// (`make bench`). The image is 256 MiB with 64 KiB clusters.

const benchSize = 256 << 20

type benchTarget interface {
	io.ReaderAt
	io.WriterAt
}

func benchTargets(b *testing.B, allocated bool) map[string]benchTarget {
	b.Helper()
	dir := b.TempDir()
	img, err := Create(filepath.Join(dir, "b.qcow2"), CreateOptions{Size: benchSize})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { img.Close() })
	f, err := os.Create(filepath.Join(dir, "b.raw"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	if err := f.Truncate(benchSize); err != nil {
		b.Fatal(err)
	}
	if allocated {
		buf := make([]byte, 1<<20)
		for i := range buf {
			buf[i] = byte(i*7 + 1)
		}
		for off := int64(0); off < benchSize; off += int64(len(buf)) {
			if _, err := img.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
			if _, err := f.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
		if err := img.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	return map[string]benchTarget{"qcow2": img, "file": f}
}

func BenchmarkReadAt(b *testing.B) {
	targets := benchTargets(b, true)
	for _, name := range []string{"file", "qcow2"} {
		t := targets[name]
		b.Run("4k-random/"+name, func(b *testing.B) {
			b.SetBytes(4096)
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, 4096)
				r := rand.New(rand.NewPCG(1, 2))
				for pb.Next() {
					if _, err := t.ReadAt(buf, r.Int64N(benchSize/4096)*4096); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
		b.Run("1M-seq/"+name, func(b *testing.B) {
			b.SetBytes(1 << 20)
			buf := make([]byte, 1<<20)
			for i := 0; i < b.N; i++ {
				if _, err := t.ReadAt(buf, int64(i%(benchSize>>20))<<20); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkWriteAt(b *testing.B) {
	for _, allocated := range []bool{true, false} {
		mode := "allocated"
		if !allocated {
			mode = "first-touch"
		}
		targets := benchTargets(b, allocated)
		for _, name := range []string{"file", "qcow2"} {
			t := targets[name]
			b.Run("4k-random/"+mode+"/"+name, func(b *testing.B) {
				b.SetBytes(4096)
				b.RunParallel(func(pb *testing.PB) {
					buf := make([]byte, 4096)
					r := rand.New(rand.NewPCG(rand.Uint64(), 2))
					for pb.Next() {
						if _, err := t.WriteAt(buf, r.Int64N(benchSize/4096)*4096); err != nil {
							b.Fatal(err)
						}
					}
				})
			})
			b.Run("1M-seq/"+mode+"/"+name, func(b *testing.B) {
				b.SetBytes(1 << 20)
				buf := make([]byte, 1<<20)
				for i := 0; i < b.N; i++ {
					if _, err := t.WriteAt(buf, int64(i%(benchSize>>20))<<20); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkReadOverlay: 4k random reads, in parallel, of a fully written
// image ("flat") and of an empty overlay over it ("clone"), whose every
// read goes through its own lookup to the backing file.
func BenchmarkReadOverlay(b *testing.B) {
	dir := b.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	img, err := Create(base, CreateOptions{Size: benchSize})
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < benchSize; off += int64(len(buf)) {
		if _, err := img.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		b.Fatal(err)
	}
	top, err := Create(filepath.Join(dir, "top.qcow2"), CreateOptions{Size: benchSize, BackingFile: "base.qcow2", BackingFormat: "qcow2"})
	if err != nil {
		b.Fatal(err)
	}
	top.Close()
	for _, c := range []struct{ name, path string }{{"flat", base}, {"clone", filepath.Join(dir, "top.qcow2")}} {
		b.Run(c.name, func(b *testing.B) {
			img, err := Open(c.path, OpenOptions{ReadOnly: true})
			if err != nil {
				b.Fatal(err)
			}
			defer img.Close()
			b.SetBytes(4096)
			b.SetParallelism(16)
			b.RunParallel(func(pb *testing.PB) {
				r := rand.New(rand.NewPCG(rand.Uint64(), 1))
				p := make([]byte, 4096)
				for pb.Next() {
					if _, err := img.ReadAt(p, r.Int64N(benchSize/4096)*4096); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
