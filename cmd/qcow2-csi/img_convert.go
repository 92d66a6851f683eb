package main

import (
	"fmt"
	"os"

	"github.com/qcow2-csi/qcow2-csi/pkg/imgcopy"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

func init() {
	registerImgCommand(imgCommand{
		name:  "convert",
		usage: "convert [--object objectdef] [--image-opts] [-c] [-f fmt] [-O output_fmt] [-o options] [-S sparse_size] [-t cache] [-m num_coroutines] [-W] [-n] [-U] [-p] [-q] filename output_filename",
		run:   runImgConvert,
	})
}

// convertTarget is the output image: a qcow2 image, or a raw file that is
// made durable on Close when -t asks for it.
type convertTarget interface {
	imgcopy.Target
	Close() error
}

type rawTarget struct {
	imgcopy.FileTarget
	sync bool
}

func (r rawTarget) Close() error {
	var err error
	if r.sync {
		err = r.Sync()
	}
	if cerr := r.File.Close(); err == nil {
		err = cerr
	}
	return err
}

// converter is one img convert run: the copy itself is imgcopy's.
type converter struct {
	dst      convertTarget
	existing bool // -n: the target exists and may hold old data
	sync     bool // -t other than unsafe: make the target durable
}

func runImgConvert(args []string) int {
	pa, err := parseArgs(args, argSpec{short: "hf:O:B:Cco:l:S:pt:T:qnm:WUr:", long: map[string]bool{"help": false, "force-share": false, "object": true, "image-opts": false, "target-image-opts": false, "salvage": false, "target-is-zero": false, "bitmaps": false, "skip-broken-bitmaps": false}})
	if err != nil {
		return imgErr("%v", err)
	}
	if pa.wantsHelp("convert") {
		return 0
	}
	for _, unsupported := range []string{"B", "C", "target-image-opts", "salvage", "bitmaps", "r"} {
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
	c := &converter{existing: pa.has("n")}
	co := imgcopy.Options{Compress: pa.has("c"), Sparse: 4096, Existing: c.existing}
	// qemu-img convert writes its target with cache=unsafe unless -t says
	// otherwise: no fsync.
	switch t, _ := pa.get("t"); t {
	case "", "unsafe":
	case "writeback", "writethrough", "none", "directsync":
		c.sync = true
	default:
		return imgErr("Invalid cache option: %s", t)
	}
	if co.Compress && outFmt != "qcow2" {
		return imgErr("Compression not supported for this file format")
	}
	if v, ok := pa.get("S"); ok {
		s, err := parseSize(v)
		if err != nil || s%512 != 0 {
			return imgErr("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512.")
		}
		co.Sparse = s
	}
	co.Workers = 8
	if v, ok := pa.get("m"); ok {
		if _, err := fmt.Sscan(v, &co.Workers); err != nil || co.Workers < 1 || co.Workers > 16 {
			return imgErr("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
		}
	}
	ia, err := newImageArgs(pa)
	if err != nil {
		return imgErr("%v", err)
	}
	defer ia.secrets.wipe()
	cs := newCreateSettings()
	cs.secrets = ia.secrets
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
	if err := checkEncryption(&cs.opts); err != nil {
		return imgErr("%v", err)
	}
	if cs.opts.Encryption != nil && (outFmt != "qcow2" || c.existing) {
		return imgErr("encrypt.* options need -O qcow2 and a new target")
	}
	inFmt, _ := pa.get("f")
	share := pa.has("U") || pa.has("force-share")
	ref, err := ia.ref(pa.pos[0], inFmt)
	if err != nil {
		return imgErr("%v", err)
	}
	src, err := openImgRef(ref, false, share)
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
	out := pa.pos[1]
	size := src.Size()
	if err := c.openTarget(out, outFmt, size, cs); err != nil {
		return imgErr("%v", err)
	}
	err = imgcopy.Copy(c.dst, src, size, co)
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
		c.dst = img
	case format == "qcow2":
		img, err := qcow2.Open(out, qcow2.OpenOptions{NoSync: !c.sync})
		if err != nil {
			return fmt.Errorf("Could not open '%s': %v", out, unwrapPathErr(err))
		}
		if img.Size() < size {
			img.Close()
			return fmt.Errorf("output file is smaller than input file")
		}
		c.dst = img
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
		c.dst = rawTarget{imgcopy.FileTarget{File: f}, c.sync}
	}
	return nil
}
