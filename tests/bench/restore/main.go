// Command restore makes a new image from one internal snapshot of a closed
// qcow2 image with pkg/snapshotter's Restore (reflink then revert where the
// file system can, else a sparse copy of the data clusters), for
// tests/bench/cbt.sh to time as a whole process.
//
// Usage: restore [-copy] SRC SNAPSHOT DST
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

func main() {
	copyOnly := flag.Bool("copy", false, "never reflink: copy the data clusters")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: restore [-copy] SRC SNAPSHOT DST")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 3 {
		flag.Usage()
		os.Exit(2)
	}
	src, name, dst := flag.Arg(0), flag.Arg(1), flag.Arg(2)
	img, err := qcow2.Open(src, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, "restore:", err)
		os.Exit(1)
	}
	m, err := snapshotter.Restore(img, name, dst, snapshotter.RestoreOptions{SourceClosed: true, NoReflink: *copyOnly})
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "restore:", err)
		os.Exit(1)
	}
	fmt.Println(m)
}
