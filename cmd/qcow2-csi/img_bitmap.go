package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"

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
	var (
		ops     []bitmapOp
		srcFile string
		gran    int64
		hasGran bool
		pos     []string
	)
	for i := 0; i < len(args); i++ {
		a := args[i]
		key, inline, hasInline := strings.Cut(a, "=")
		if !strings.HasPrefix(a, "--") {
			key, hasInline = a, false
			if len(a) > 2 && a[0] == '-' {
				key, inline, hasInline = a[:2], a[2:], true
			}
		}
		val := func() (string, bool) {
			if hasInline {
				return inline, true
			}
			if i+1 < len(args) {
				i++
				return args[i], true
			}
			return "", false
		}
		switch key {
		case "-h", "--help":
			fmt.Print(imgBitmapHelp)
			return 0
		case "--add", "--remove", "--clear", "--enable", "--disable":
			ops = append(ops, bitmapOp{op: key[2:]})
		case "--merge":
			v, ok := val()
			if !ok {
				return fail("--merge needs a source bitmap")
			}
			ops = append(ops, bitmapOp{op: "merge", src: v})
		case "-b", "--source-file":
			v, ok := val()
			if !ok {
				return fail("-b needs a file name")
			}
			srcFile = v
		case "-F", "--source-format", "-f", "--format":
			v, ok := val()
			if !ok || v != "qcow2" {
				return fail("only the qcow2 format is supported")
			}
		case "-g", "--granularity":
			v, ok := val()
			if !ok {
				return fail("-g needs a size")
			}
			g, err := parseBitmapSize(v)
			if err != nil {
				return fail("invalid granularity %q: %v", v, err)
			}
			gran, hasGran = g, true
		default:
			if len(a) > 1 && a[0] == '-' {
				return fail("unknown option %s\n%s", a, imgBitmapHelp)
			}
			pos = append(pos, a)
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

// parseBitmapSize reads a byte count with qemu's optional binary suffix
// (k, M, G, T; b for bytes).
func parseBitmapSize(s string) (int64, error) {
	mult := int64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'b', 'B':
			s = s[:n-1]
		case 'k', 'K':
			mult, s = 1<<10, s[:n-1]
		case 'm', 'M':
			mult, s = 1<<20, s[:n-1]
		case 'g', 'G':
			mult, s = 1<<30, s[:n-1]
		case 't', 'T':
			mult, s = 1<<40, s[:n-1]
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("not a size")
	}
	return v * mult, nil
}
