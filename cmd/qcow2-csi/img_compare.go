package main

import (
	"bytes"
	"fmt"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

func init() {
	registerImgCommand(imgCommand{
		name:  "compare",
		usage: "compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2",
		run:   runImgCompare,
	})
}

// Exit codes of qemu-img compare.
const (
	cmpIdentical = 0
	cmpDifferent = 1
	cmpError     = 2
)

func runImgCompare(args []string) int {
	pa, err := parseArgs(args, argSpec{short: "hf:F:T:pqsU", long: map[string]bool{"help": false, "force-share": false, "object": true, "image-opts": false}})
	if err != nil {
		imgErr("%v", err)
		return cmpError
	}
	if pa.wantsHelp("compare") {
		return 0
	}
	if len(pa.pos) != 2 {
		imgErr("Expecting two image file names")
		return cmpError
	}
	share := pa.has("U") || pa.has("force-share")
	quiet := pa.has("q")
	strict := pa.has("s")
	f1, _ := pa.get("f")
	f2, _ := pa.get("F")
	var refs [2]imageRef
	ia, err := newImageArgs(pa)
	if err != nil {
		imgErr("%v", err)
		return cmpError
	}
	defer ia.secrets.wipe()
	r1, err := ia.ref(pa.pos[0], f1)
	if err == nil {
		var r2 imageRef
		r2, err = ia.ref(pa.pos[1], f2)
		refs = [2]imageRef{r1, r2}
	}
	if err != nil {
		imgErr("%v", err)
		return cmpError
	}
	a, err := openImgRef(refs[0], false, share)
	if err != nil {
		imgErr("%v", err)
		return cmpError
	}
	defer a.Close()
	b, err := openImgRef(refs[1], false, share)
	if err != nil {
		imgErr("%v", err)
		return cmpError
	}
	defer b.Close()
	say := func(format string, args ...any) {
		if !quiet {
			fmt.Printf(format, args...)
		}
	}
	common := min(a.Size(), b.Size())
	off, err := firstDifference(a, b, 0, common)
	if err != nil {
		imgErr("%v", err)
		return cmpError
	}
	if off >= 0 {
		say("Content mismatch at offset %d!\n", off)
		return cmpDifferent
	}
	if a.Size() != b.Size() {
		if strict {
			say("Strict mode: Image size mismatch!\n")
			return cmpDifferent
		}
		say("Warning: Image size mismatch!\n")
		longer := a
		if b.Size() > a.Size() {
			longer = b
		}
		off, err := firstNonZero(longer, common, longer.Size())
		if err != nil {
			imgErr("%v", err)
			return cmpError
		}
		if off >= 0 {
			say("Content mismatch at offset %d!\n", off)
			return cmpDifferent
		}
	}
	say("Images are identical.\n")
	return cmpIdentical
}

const cmpChunk = 2 << 20

// zeroRanges returns the ranges of [off, off+n) known to read as zeroes.
func zeroAt(exts []qcow2.Extent, pos int64) (bool, int64) {
	for _, x := range exts {
		if pos >= x.Start && pos < x.Start+x.Length {
			return x.Zero || !x.Present, x.Start + x.Length
		}
	}
	return false, pos
}

// firstDifference returns the offset of the first differing 512-byte
// sector in [off, end), or -1. Ranges both images report as zero are
// skipped without reading.
func firstDifference(a, b imgFile, off, end int64) (int64, error) {
	ba, bb := make([]byte, cmpChunk), make([]byte, cmpChunk)
	for off < end {
		n := min(int64(cmpChunk), end-off)
		ea, err := a.BlockStatus(off, n)
		if err != nil {
			return 0, err
		}
		eb, err := b.BlockStatus(off, n)
		if err != nil {
			return 0, err
		}
		za, enda := zeroAt(ea, off)
		zb, endb := zeroAt(eb, off)
		if za && zb {
			off = min(enda, endb, end)
			continue
		}
		if _, err := readFullAt(a, ba[:n], off); err != nil {
			return 0, err
		}
		if _, err := readFullAt(b, bb[:n], off); err != nil {
			return 0, err
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			for i := int64(0); i < n; i++ {
				if ba[i] != bb[i] {
					return off + i&^511, nil
				}
			}
		}
		off += n
	}
	return -1, nil
}

func firstNonZero(a imgFile, off, end int64) (int64, error) {
	buf := make([]byte, cmpChunk)
	for off < end {
		n := min(int64(cmpChunk), end-off)
		ea, err := a.BlockStatus(off, n)
		if err != nil {
			return 0, err
		}
		if z, e := zeroAt(ea, off); z {
			off = min(e, end)
			continue
		}
		if _, err := readFullAt(a, buf[:n], off); err != nil {
			return 0, err
		}
		for i := int64(0); i < n; i++ {
			if buf[i] != 0 {
				return off + i&^511, nil
			}
		}
		off += n
	}
	return -1, nil
}

// readFullAt reads len(p) bytes; io.EOF at the very end is not an error.
func readFullAt(r imgFile, p []byte, off int64) (int, error) {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return n, nil
	}
	return n, err
}
