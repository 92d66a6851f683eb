package qcow2

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkLUKS4k reads and writes 4 KiB at random cluster-aligned
// offsets of a fully allocated 64 MiB image, plain and encrypted, in one
// run: the ratio is what encryption (x/crypto XTS, 8 sectors a request)
// costs the library itself, without NBD or fio. Also 1 MiB requests, and
// xts/decrypt-4096: x/crypto/xts alone on 4 KiB (the eight sectors of a
// 4 KiB read, no image), the floor the encrypted rows stand on.
func BenchmarkLUKS4k(b *testing.B) {
	const size = 64 << 20
	b.Run("xts/decrypt-4096", func(b *testing.B) {
		c, err := newXTS(make([]byte, 64))
		if err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 4096)
		b.SetBytes(int64(len(buf)))
		for i := range b.N {
			xtsSectors(c, buf, uint64(i), false)
		}
	})
	for _, enc := range []bool{false, true} {
		p := filepath.Join(b.TempDir(), "b.qcow2")
		o := CreateOptions{Size: size, NoSync: true}
		if enc {
			o.Encryption = &EncryptionOptions{Passphrase: []byte("bench"), IterTime: luksTestIterTime}
		}
		img, err := Create(p, o)
		if err != nil {
			b.Fatal(err)
		}
		fill := make([]byte, 1<<20)
		for off := int64(0); off < size; off += int64(len(fill)) {
			if _, err := img.WriteAt(fill, off); err != nil {
				b.Fatal(err)
			}
		}
		name := map[bool]string{false: "plain", true: "luks"}[enc]
		for _, bs := range []int{4096, 1 << 20} {
			buf := make([]byte, bs)
			n := int64(size / bs)
			b.Run(fmt.Sprintf("%s/read-%d", name, bs), func(b *testing.B) {
				b.SetBytes(int64(bs))
				for i := range b.N {
					if _, err := img.ReadAt(buf, (int64(i*7919)%n)*int64(bs)); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run(fmt.Sprintf("%s/write-%d", name, bs), func(b *testing.B) {
				b.SetBytes(int64(bs))
				for i := range b.N {
					if _, err := img.WriteAt(buf, (int64(i*7919)%n)*int64(bs)); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
		img.Close()
	}
}

// BenchmarkLUKSFirstTouch4k times 4 KiB writes each to a cluster never
// written before (a fresh volume's first writes: fio's first-touch
// randwrite rows), plain and encrypted, with and without extended L2. An
// encrypted image without subclusters encrypts the whole 64 KiB cluster,
// its zero fill included (zeroes on disk would decrypt to noise); with
// extended L2 the unwritten subclusters are marked unallocated and only
// the 2 KiB subclusters the write touches are encrypted.
func BenchmarkLUKSFirstTouch4k(b *testing.B) {
	const clusters = 4096 // per image: 256 MiB of 64 KiB clusters
	for _, c := range []struct {
		name     string
		enc, ext bool
	}{{"plain", false, false}, {"plain-extl2", false, true}, {"luks", true, false}, {"luks-extl2", true, true}} {
		b.Run(c.name, func(b *testing.B) {
			o := CreateOptions{Size: clusters << 16, NoSync: true, ExtendedL2: c.ext}
			if c.enc {
				o.Encryption = &EncryptionOptions{Passphrase: []byte("bench"), IterTime: luksTestIterTime}
			}
			dir := b.TempDir()
			var img *Image
			fresh := func() {
				b.StopTimer()
				if img != nil {
					img.Close()
				}
				p := filepath.Join(dir, "b.qcow2")
				os.Remove(p)
				var err error
				if img, err = Create(p, o); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			buf := make([]byte, 4096)
			b.SetBytes(int64(len(buf)))
			for i := range b.N {
				if i%clusters == 0 {
					fresh()
				}
				// A fresh cluster each time, at a 4 KiB offset inside it
				// that varies, as random writes land.
				vc := int64((i % clusters) * 2654435761 % clusters)
				if _, err := img.WriteAt(buf, vc<<16+int64(i%16)*4096); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			img.Close()
		})
	}
}
