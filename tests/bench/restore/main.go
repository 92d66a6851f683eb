// Command restore makes a new image from one internal snapshot of a closed
// qcow2 image with pkg/snapshotter, for tests/bench/cbt.sh and
// tests/bench/clone.sh to time as a whole process, by one of the CSI
// driver's clone modes:
//
//	copy     Restore without reflink: a sparse copy of the data clusters
//	reflink  Restore: reflink then revert where the file system can, else copy
//	overlay  Freeze the snapshot into BASE unless BASE exists (the driver
//	         does that once per snapshot), then an empty overlay over it
//
// It prints how the image was made.
//
// Usage: restore [-copy] [-mode copy|reflink|overlay] [-base BASE] SRC SNAPSHOT DST
package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

func main() {
	copyOnly := flag.Bool("copy", false, "never reflink: copy the data clusters (-mode copy)")
	mode := flag.String("mode", "reflink", "copy, reflink or overlay")
	base := flag.String("base", "", "the base image of -mode overlay (made from the snapshot when missing)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: restore [-copy] [-mode copy|reflink|overlay] [-base BASE] SRC SNAPSHOT DST")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 3 || (*mode == "overlay" && *base == "") {
		flag.Usage()
		os.Exit(2)
	}
	if *copyOnly {
		*mode = "copy"
	}
	src, name, dst := flag.Arg(0), flag.Arg(1), flag.Arg(2)
	m, err := restore(*mode, src, name, dst, *base)
	if err != nil {
		fmt.Fprintln(os.Stderr, "restore:", err)
		os.Exit(1)
	}
	fmt.Println(m)
}

func restore(mode, src, name, dst, base string) (string, error) {
	switch mode {
	case "copy", "reflink":
	case "overlay":
		made := ""
		if _, err := os.Stat(base); errors.Is(err, fs.ErrNotExist) {
			m, err := freeze(src, name, base)
			if err != nil {
				return "", err
			}
			made = " (base made by " + string(m) + ")"
		}
		if err := snapshotter.Overlay(base, dst, snapshotter.OverlayOptions{}); err != nil {
			return "", err
		}
		return "overlay" + made, nil
	default:
		return "", fmt.Errorf("unknown mode %q", mode)
	}
	img, err := qcow2.Open(src, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		return "", err
	}
	m, err := snapshotter.Restore(img, name, dst, snapshotter.RestoreOptions{SourceClosed: true, NoReflink: mode == "copy"})
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return string(m), err
}

func freeze(src, name, base string) (snapshotter.Method, error) {
	img, err := qcow2.Open(src, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		return "", err
	}
	m, _, err := snapshotter.Freeze(img, name, base, 4, snapshotter.RestoreOptions{SourceClosed: true})
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return m, err
}
