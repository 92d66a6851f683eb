package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// `img resize`: qemu-img 7.2's resize sub-command. The size is always the
// last argument (taken off before option parsing, so "-1G" is a size, not an
// option), shrinking needs --shrink, exit status 0 or 1.

func init() {
	registerImgCommand(imgCommand{
		name:  "resize",
		usage: "resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size",
		run:   runImgResize,
	})
}

const resizeHelp = `Usage: qcow2-csi img resize [-f qcow2] [--preallocation=off] [-q] [--shrink] filename [+ | -]size

Changes the virtual size of a qcow2 image, as qemu-img resize does. A size
with + or - is relative to the current size. Suffixes k, M, G, T, P, E (powers
of 1024) are accepted. Shrinking needs --shrink and frees the clusters past
the new end; it is refused on compat=0.10 images with snapshots and while a
persistent bitmap is inconsistent.

  --shrink            allow the new size to be smaller than the current one
  --preallocation=off the only mode supported here (qemu-img also has
                      metadata, falloc and full)
  -f qcow2            the image format (only qcow2)
  -q                  quiet
`

func runImgResize(args []string) int {
	// qemu-img removes the size first so that negative sizes are not
	// mistaken for options.
	if len(args) < 2 {
		return faceUsageError("Not enough arguments")
	}
	sizeArg := args[len(args)-1]
	pa, err := parseArgs(args[:len(args)-1], argSpec{
		short: "f:hq",
		long:  map[string]bool{"help": false, "object": true, "image-opts": false, "preallocation": true, "shrink": false},
	})
	if err != nil {
		return faceUsageError(err.Error())
	}
	var quiet, shrink bool
	for _, o := range pa.opts {
		switch o.name {
		case "h", "help":
			fmt.Print(resizeHelp)
			return 0
		case "f":
			if o.val != "qcow2" {
				return imgErr("resize: format '%s' is not supported (only qcow2)", o.val)
			}
		case "q":
			quiet = true
		case "shrink":
			shrink = true
		case "preallocation":
			switch o.val {
			case "off":
			case "metadata", "falloc", "full":
				return imgErr("Preallocation mode '%s' is not supported by qcow2-csi resize (only off)", o.val)
			default:
				return imgErr("Invalid preallocation mode '%s'", o.val)
			}
		}
	}
	if len(pa.pos) != 1 {
		return faceUsageError("Expecting image file name and size")
	}
	ref, wipe, err := imageFromArgs(pa, pa.pos[0], "")
	if err != nil {
		return imgErr("%v", err)
	}
	defer wipe()
	filename := ref.path

	relative := 0
	s := sizeArg
	switch {
	case strings.HasPrefix(s, "+"):
		relative, s = 1, s[1:]
	case strings.HasPrefix(s, "-"):
		relative, s = -1, s[1:]
	}
	n, err := parseSize(s)
	if err != nil {
		return imgErr("Parameter 'size' expects a non-negative number below 2^64\n" +
			"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
			"and exabytes, respectively.")
	}

	// Resizing is metadata: an encrypted image needs no key here.
	img, err := qcow2.Open(filename, ref.openOptions(false, false))
	if err != nil {
		return imgErr("Could not open '%s': %v", filename, err)
	}
	defer img.Close()

	cur := img.Size()
	var total int64
	switch {
	case relative == 0:
		total = n
	case relative > 0:
		if n > 1<<63-1-cur {
			return imgErr("Failed to grow the L1 table: File too large")
		}
		total = cur + n
	default:
		if n >= cur {
			return imgErr("New image size must be positive")
		}
		total = cur - n
	}
	if total <= 0 {
		return imgErr("New image size must be positive")
	}
	if total < cur && !shrink {
		imgErr("Use the --shrink option to perform a shrink operation.")
		fmt.Fprintf(os.Stderr, "qcow2-csi img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n")
		return 1
	}
	if err := img.Resize(total, qcow2.ResizeOptions{Shrink: shrink}); err != nil {
		return imgErr("%s", resizeErrorText(err))
	}
	if err := img.Close(); err != nil {
		return imgErr("%s: %v", filename, err)
	}
	if !quiet {
		fmt.Println("Image resized.")
	}
	return 0
}

// resizeErrorText words the library's refusals as qemu-img does where it has
// a sentence for them.
func resizeErrorText(err error) string {
	switch {
	case errors.Is(err, qcow2.ErrTooLarge):
		return "Failed to grow the L1 table: File too large"
	}
	return err.Error()
}
