package main

import (
	"fmt"
	"os"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

func init() {
	registerImgCommand(imgCommand{
		name:  "bitmap",
		usage: "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [-f fmt] filename bitmap",
		run:   runImgBitmap,
	})
}

const imgBitmapHelp = `Usage: qcow2-csi img bitmap (--merge SOURCE | --add | --remove | --clear |
         --enable | --disable)... [-b SOURCE_FILE [-F qcow2]] [-g GRANULARITY]
         [-f qcow2] FILE BITMAP

Changes the persistent dirty bitmap BITMAP of the qcow2 image FILE, as
qemu-img bitmap does. Operations run in the order given.

  --add             create BITMAP (empty, recording writes unless --disable
                    is also given); -g sets the granularity (512 to 2G,
                    suffixes k/M/G; default: the cluster size within 4k..64k)
  --remove          delete BITMAP (the only operation an inconsistent bitmap
                    allows)
  --clear           reset every bit
  --enable          record writes from now on
  --disable         stop recording writes
  --merge SOURCE    OR bitmap SOURCE into BITMAP (granularities may differ);
                    -b SOURCE_FILE takes SOURCE from another image of the
                    same size
`

type bitmapOp struct {
	op  string
	src string
}

func runImgBitmap(args []string) int {
	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "qcow2-csi img bitmap: "+format+"\n", a...)
		return 1
	}
	pa, err := parseArgs(args, argSpec{
		short: "hb:F:f:g:",
		long: map[string]bool{"help": false, "add": false, "remove": false, "clear": false, "enable": false, "disable": false,
			"merge": true, "source-file": true, "source-format": true, "format": true, "granularity": true},
	})
	if err != nil {
		return fail("%v\n%s", err, imgBitmapHelp)
	}
	var (
		ops     []bitmapOp
		srcFile string
		gran    int64
		hasGran bool
		pos     = pa.pos
	)
	for _, o := range pa.opts {
		switch o.name {
		case "h", "help":
			fmt.Print(imgBitmapHelp)
			return 0
		case "add", "remove", "clear", "enable", "disable":
			ops = append(ops, bitmapOp{op: o.name})
		case "merge":
			ops = append(ops, bitmapOp{op: "merge", src: o.val})
		case "b", "source-file":
			srcFile = o.val
		case "F", "source-format", "f", "format":
			if o.val != "qcow2" {
				return fail("only the qcow2 format is supported")
			}
		case "g", "granularity":
			g, err := parseSize(o.val)
			if err != nil {
				return fail("invalid granularity %q: %v", o.val, err)
			}
			gran, hasGran = g, true
		}
	}
	if len(ops) == 0 {
		return fail("need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
	}
	if hasGran && !hasOp(ops, "add") {
		return fail("granularity only supported with --add")
	}
	if srcFile != "" && !hasOp(ops, "merge") {
		return fail("-b only supported with --merge")
	}
	if len(pos) != 2 {
		return fail("expecting image file name and bitmap name")
	}
	file, name := pos[0], pos[1]
	img, err := qcow2.Open(file, qcow2.OpenOptions{})
	if err != nil {
		return fail("Could not open '%s': %v", file, err)
	}
	var src *qcow2.Image
	if srcFile != "" {
		if src, err = qcow2.Open(srcFile, qcow2.OpenOptions{ReadOnly: true}); err != nil {
			img.Close()
			return fail("Could not open '%s': %v", srcFile, err)
		}
		defer src.Close()
	}
	disabled := hasOp(ops, "disable")
	for _, o := range ops {
		switch o.op {
		case "add":
			// qemu-img: --add --disable creates the bitmap disabled.
			err = img.AddBitmap(name, qcow2.BitmapOptions{Granularity: gran, Disabled: disabled})
		case "remove":
			err = img.RemoveBitmap(name)
		case "clear":
			err = img.ClearBitmap(name)
		case "enable":
			err = img.EnableBitmap(name)
		case "disable":
			err = img.DisableBitmap(name)
		case "merge":
			if src != nil {
				err = img.MergeBitmapFrom(name, src, o.src)
			} else {
				err = img.MergeBitmap(name, o.src)
			}
		}
		if err != nil {
			img.Close()
			return fail("operation %s on bitmap '%s' failed: %v", o.op, name, err)
		}
	}
	if err := img.Close(); err != nil {
		return fail("%s: %v", file, err)
	}
	return 0
}

func hasOp(ops []bitmapOp, op string) bool {
	for _, o := range ops {
		if o.op == op {
			return true
		}
	}
	return false
}
