package snapshotter

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// BenchmarkDelta100GiB: Delta over a 100 GiB disk with 1 GiB changed in
// 16384 scattered 64 KiB runs (zero writes: they mark the bitmap like data
// writes without filling the disk). Also Allocated on the same snapshot.
func BenchmarkDelta100GiB(b *testing.B) {
	const size = 100 << 30
	img, err := qcow2.Create(filepath.Join(b.TempDir(), "big.qcow2"), qcow2.CreateOptions{Size: size})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	if _, err := Take(img, "s1", 1); err != nil {
		b.Fatal(err)
	}
	const runs, run = 16384, 64 << 10
	for i := int64(0); i < runs; i++ {
		if err := img.WriteZeroes(i*(size/runs), run, 0); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := Take(img, "s2", 2); err != nil {
		b.Fatal(err)
	}
	b.Run("GetMetadataDelta", func(b *testing.B) {
		for range b.N {
			d, err := Delta(img, 1, 2, 0, size)
			if err != nil || len(d) != runs {
				b.Fatalf("%d ranges, %v", len(d), err)
			}
		}
	})
	b.Run("GetMetadataAllocated", func(b *testing.B) {
		for range b.N {
			if _, err := Allocated(img, "s2", 0, size); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRestore512MiB: restore of a snapshot holding 512 MiB of data by
// sparse copy (the test's temporary directory) and by reflink (an xfs with
// reflink=1 on a loop device; root only).
func BenchmarkRestore512MiB(b *testing.B) {
	const size = 512 << 20
	mk := func(b *testing.B, dir string) *qcow2.Image {
		img, err := qcow2.Create(filepath.Join(dir, "src.qcow2"), qcow2.CreateOptions{Size: size})
		if err != nil {
			b.Fatal(err)
		}
		p := bytes.Repeat([]byte{0x5a}, 1<<20)
		for off := int64(0); off < size; off += int64(len(p)) {
			if _, err := img.WriteAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := Take(img, "s", 1); err != nil {
			b.Fatal(err)
		}
		return img
	}
	run := func(b *testing.B, dir string, want Method) {
		img := mk(b, dir)
		defer img.Close()
		b.SetBytes(size)
		b.ResetTimer()
		for i := range b.N {
			dst := filepath.Join(dir, fmt.Sprintf("dst%d.qcow2", i))
			m, err := Restore(img, "s", dst, RestoreOptions{SourceClosed: true})
			if err != nil || m != want {
				b.Fatalf("%s, %v", m, err)
			}
			b.StopTimer()
			os.Remove(dst)
			b.StartTimer()
		}
	}
	b.Run("copy", func(b *testing.B) { run(b, b.TempDir(), MethodCopy) })
	b.Run("reflink", func(b *testing.B) {
		if os.Geteuid() != 0 {
			b.Skip("needs root for the xfs loop mount")
		}
		dir := b.TempDir()
		fsimg, mnt := filepath.Join(dir, "xfs.img"), filepath.Join(dir, "mnt")
		os.Mkdir(mnt, 0o700)
		if err := os.WriteFile(fsimg, nil, 0o600); err != nil {
			b.Fatal(err)
		}
		os.Truncate(fsimg, 2<<30)
		for _, c := range [][]string{{"mkfs.xfs", "-q", "-m", "reflink=1", fsimg}, {"mount", "-o", "loop", fsimg, mnt}} {
			if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
				b.Fatalf("%v: %v %s", c, err, out)
			}
		}
		defer exec.Command("umount", mnt).Run()
		run(b, mnt, MethodReflink)
	})
}
