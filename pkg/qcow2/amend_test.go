package qcow2

import (
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

type qemuFormatInfo struct {
	VirtualSize    int64  `json:"virtual-size"`
	BackingFile    string `json:"backing-filename"`
	BackingFormat  string `json:"backing-filename-format"`
	FormatSpecific struct {
		Data struct {
			Compat          string `json:"compat"`
			LazyRefcounts   bool   `json:"lazy-refcounts"`
			RefcountBits    int    `json:"refcount-bits"`
			CompressionType string `json:"compression-type"`
			ExtendedL2      bool   `json:"extended-l2"`
		} `json:"data"`
	} `json:"format-specific"`
}

func qemuImgInfo(t testing.TB, path string) qemuFormatInfo {
	t.Helper()
	var info qemuFormatInfo
	if err := json.Unmarshal([]byte(qemu(t, "qemu-img", "info", "-U", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return info
}

func amendBool(b bool) *bool    { return &b }
func amendStr(s string) *string { return &s }
func TestAmendAcceptedByQemu(t *testing.T) {
	type want struct {
		compat  string
		lazy    bool
		refbits int
		backing string
	}
	cases := []struct {
		name    string
		create  string
		backing bool // create over a raw backing file
		io      []string
		snap    bool
		opts    AmendOptions
		want    want
	}{
		{"downgrade expands zero clusters", "compat=1.1", false,
			[]string{"write -P 1 0 1M", "write -z 2M 1M", "write -P 2 4M 64k", "write -z 4M 64k"}, true,
			AmendOptions{Compat: "0.10"}, want{"0.10", false, 16, ""}},
		{"downgrade over a backing file", "compat=1.1", true,
			[]string{"write -z 0 1M", "write -P 3 1M 1M", "write -z 3M 64k"}, true,
			AmendOptions{Compat: "0.10"}, want{"0.10", false, 16, "base.raw"}},
		{"downgrade lazy zstd without compressed clusters", "compat=1.1,lazy_refcounts=on,compression_type=zstd", false,
			[]string{"write -P 1 0 1M"}, false,
			AmendOptions{Compat: "v2"}, want{"0.10", false, 16, ""}},
		{"upgrade with old snapshots", "compat=0.10", false,
			[]string{"write -P 1 0 1M"}, true,
			AmendOptions{Compat: "1.1"}, want{"1.1", false, 16, ""}},
		{"upgrade and lazy", "compat=0.10", false,
			[]string{"write -P 1 0 1M"}, false,
			AmendOptions{Compat: "1.1", LazyRefcounts: amendBool(true)}, want{"1.1", true, 16, ""}},
		{"lazy off", "lazy_refcounts=on", false,
			[]string{"write -P 1 0 1M"}, false,
			AmendOptions{LazyRefcounts: amendBool(false)}, want{"1.1", false, 16, ""}},
		{"refcount bits 1", "refcount_bits=16", false,
			[]string{"write -P 1 0 1M", "write -c -P 2 2M 64k"}, false,
			AmendOptions{RefcountBits: 1}, want{"1.1", false, 1, ""}},
		{"refcount bits 64 with snapshots", "refcount_bits=16", false,
			[]string{"write -P 1 0 1M"}, true,
			AmendOptions{RefcountBits: 64}, want{"1.1", false, 64, ""}},
		{"upgrade and refcount bits 8", "compat=0.10", false,
			[]string{"write -P 1 0 1M"}, true,
			AmendOptions{Compat: "1.1", RefcountBits: 8}, want{"1.1", false, 8, ""}},
		{"backing file set", "compat=1.1", false,
			[]string{"write -P 1 0 1M"}, false,
			AmendOptions{BackingFile: amendStr("base.raw"), BackingFormat: amendStr("raw")}, want{"1.1", false, 16, "base.raw"}},
		{"backing file removed", "compat=1.1", true,
			[]string{"write -P 1 0 1M"}, false,
			AmendOptions{BackingFile: amendStr("")}, want{"1.1", false, 16, ""}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "a.qcow2")
			args := []string{"create", "-q", "-f", "qcow2", "-o", c.create}
			base := filepath.Join(dir, "base.raw")
			qemu(t, "qemu-img", "create", "-q", "-f", "raw", base, "8M")
			qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xbb 0 8M", base)
			if c.backing {
				args = append(args, "-b", "base.raw", "-F", "raw")
			}
			qemu(t, "qemu-img", append(args, p, "8M")...)
			qemuIOAll(t, p, c.io...)
			if c.snap {
				qemu(t, "qemu-img", "snapshot", "-c", "s1", p)
				qemuIOAll(t, p, "write -P 9 5M 64k")
			}
			orig := filepath.Join(dir, "orig.qcow2")
			copyImage(t, p, orig)
			img, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Amend(c.opts); err != nil {
				img.Close()
				t.Fatalf("Amend(%+v): %v", c.opts, err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			checkCleanWhen(t, p, "after Amend")
			info := qemuImgInfo(t, p)
			d := info.FormatSpecific.Data
			if d.Compat != c.want.compat || d.LazyRefcounts != c.want.lazy || d.RefcountBits != c.want.refbits {
				t.Fatalf("qemu-img info: compat %s lazy %t refcount bits %d, want %+v", d.Compat, d.LazyRefcounts, d.RefcountBits, c.want)
			}
			if info.BackingFile != c.want.backing {
				t.Fatalf("backing file %q, want %q", info.BackingFile, c.want.backing)
			}
			if c.opts.BackingFile == nil {
				// Data unchanged, as qemu sees it.
				qemu(t, "qemu-img", "compare", "-U", orig, p)
				if c.snap {
					if got, want := qemuSnapshotRawByID(t, p, "1"), qemuSnapshotRawByID(t, orig, "1"); firstDiffAt(got, want) >= 0 {
						t.Fatal("snapshot data changed")
					}
				}
			}
		})
	}
}

func TestAmendRefusals(t *testing.T) {
	dir := t.TempDir()
	mk := func(name, opts string, setup func(p string)) string {
		p := filepath.Join(dir, name)
		qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "64M")
		if setup != nil {
			setup(p)
		}
		return p
	}
	cases := []struct {
		name string
		path string
		opts AmendOptions
		want string // words the error must contain
	}{
		{"downgrade refcount bits", mk("rb.qcow2", "refcount_bits=8", nil), AmendOptions{Compat: "0.10"}, "refcount_bits=16"},
		{"downgrade extended L2", mk("el2.qcow2", "extended_l2=on", nil), AmendOptions{Compat: "0.10"}, "incompatible features 0x10"},
		{"downgrade zstd compressed", mk("zstd.qcow2", "compression_type=zstd", func(p string) { qemuIOAll(t, p, "write -c 0 64k") }),
			AmendOptions{Compat: "0.10"}, "zstd"},
		{"downgrade zstd compressed in a snapshot only", mk("zstd2.qcow2", "compression_type=zstd", func(p string) {
			qemuIOAll(t, p, "write -c 0 64k")
			qemu(t, "qemu-img", "snapshot", "-c", "s", p)
			qemuIOAll(t, p, "write 0 64k")
		}), AmendOptions{Compat: "0.10"}, "zstd"},
		{"downgrade snapshot of another size", mk("snapsize.qcow2", "compat=1.1", func(p string) {
			qemu(t, "qemu-img", "snapshot", "-c", "s", p)
			qemu(t, "qemu-img", "resize", "-q", p, "128M")
		}), AmendOptions{Compat: "0.10"}, "snapshots prevent downgrade"},
		{"downgrade with bitmaps", mk("bm.qcow2", "compat=1.1", func(p string) { qemu(t, "qemu-img", "bitmap", "--add", p, "b0") }),
			AmendOptions{Compat: "0.10"}, "bitmaps"},
		{"lazy on v2", mk("v2.qcow2", "compat=0.10", nil), AmendOptions{LazyRefcounts: amendBool(true)}, "compatibility level 1.1"},
		{"refcount bits on v2", mk("v2b.qcow2", "compat=0.10", nil), AmendOptions{RefcountBits: 8}, "compatibility level 1.1"},
		{"refcount bits 3", mk("rb3.qcow2", "compat=1.1", nil), AmendOptions{RefcountBits: 3}, "power of two"},
		{"refcount bits too narrow for snapshots", mk("rbn.qcow2", "compat=1.1", func(p string) {
			qemuIOAll(t, p, "write 0 64k")
			qemu(t, "qemu-img", "snapshot", "-c", "s", p)
			qemu(t, "qemu-img", "snapshot", "-c", "t", p)
		}), AmendOptions{RefcountBits: 1}, "refcount"},
		{"unknown compat", mk("c.qcow2", "compat=1.1", nil), AmendOptions{Compat: "0.9"}, "compatibility level 0.9"},
		{"backing format without backing file", mk("bf.qcow2", "compat=1.1", nil), AmendOptions{BackingFormat: amendStr("raw")}, "backing file"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			orig := c.path + ".orig"
			copyImage(t, c.path, orig)
			img, err := Open(c.path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			err = img.Amend(c.opts)
			img.Close()
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Amend(%+v) = %v, want an error saying %q", c.opts, err, c.want)
			}
			if !errors.Is(err, ErrUnsupported) && !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("error %v wraps neither ErrUnsupported nor ErrInvalidOption", err)
			}
			checkCleanWhen(t, c.path, "after a refused amend")
			qemu(t, "qemu-img", "compare", "-U", orig, c.path)
			if got, want := qemuImgInfo(t, c.path).FormatSpecific.Data, qemuImgInfo(t, orig).FormatSpecific.Data; got != want {
				t.Fatalf("a refused amend changed the format: %+v -> %+v", want, got)
			}
		})
	}
}
