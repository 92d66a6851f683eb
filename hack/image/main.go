// Command image builds the qcow2-csi container image as a docker-archive
// tarball without a container engine (see package imagetar): the static
// qcow2-csi binary plus the Debian filesystem tools it calls, with their
// libraries, taken from this host. Load it with
//
//	ctr -n k8s.io images import qcow2-csi.tar     (containerd)
//	docker load -i qcow2-csi.tar                  (Docker)
//
// Usage: go run ./hack/image -binary bin/qcow2-csi -ref ghcr.io/qcow2-csi/qcow2-csi:dev -o bin/qcow2-csi-image.tar
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/qcow2-csi/qcow2-csi/hack/image/imagetar"
)

func main() {
	bin := flag.String("binary", "bin/qcow2-csi", "statically linked qcow2-csi binary (CGO_ENABLED=0)")
	ref := flag.String("ref", "ghcr.io/qcow2-csi/qcow2-csi:dev", "image reference to tag the image with")
	out := flag.String("o", "bin/qcow2-csi-image.tar", "output docker-archive tarball")
	busybox := flag.String("busybox", "/bin/busybox", "static busybox for /bin/sh in the image (Debian busybox-static); empty for none")
	flag.Parse()
	bb := *busybox
	if bb != "" {
		if _, err := os.Stat(bb); err != nil {
			fmt.Fprintf(os.Stderr, "image: busybox %s: %v (install busybox-static or pass -busybox='')\n", bb, err)
			os.Exit(1)
		}
	}
	im, err := imagetar.Driver(*bin, bb)
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	id, err := im.WriteFile(*out, *ref)
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	fmt.Printf("%s: %s %s\n", *out, *ref, id)
}
