package main

import (
	"errors"
	"fmt"

	"github.com/qcow2-csi/qcow2-csi/pkg/imagebackend"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// openNBDBackend opens FILE in the given format as the Backend to serve.
func openNBDBackend(o *nbdOptions, format string, readOnly bool) (nbdattach.Backend, func() error, error) {
	switch format {
	case "raw":
		if o.snapshot != "" || o.bitmap != "" {
			return nil, nil, errors.New("-l and -B need a qcow2 image")
		}
		if o.allocationDepth {
			return nil, nil, errors.New("-A is supported for qcow2 images only")
		}
		b, err := nbdattach.OpenFile(o.file, readOnly)
		if err != nil {
			return nil, nil, err
		}
		return b, b.Close, nil
	case "qcow2":
		img, err := qcow2.Open(o.file, qcow2.OpenOptions{ReadOnly: readOnly, CrashConsistentBitmaps: o.crashConsistent, Passphrase: o.passphrase})
		if err != nil {
			return nil, nil, err
		}
		if img.Encrypted() && o.passphrase == nil {
			img.Close()
			return nil, nil, keyError(qcow2.ErrKeyRequired)
		}
		opts := imagebackend.Options{AllocationDepth: o.allocationDepth}
		if o.bitmap != "" {
			opts.Bitmaps = []string{o.bitmap}
		}
		if o.snapshot != "" {
			b, closeAll, err := openSnapshotBackend(img, o.file, o.snapshot, opts)
			if err != nil {
				img.Close()
				return nil, nil, err
			}
			return b, closeAll, nil
		}
		b, err := imagebackend.New(img, opts)
		if err != nil {
			img.Close()
			return nil, nil, err
		}
		return b, img.Close, nil
	}
	return nil, nil, fmt.Errorf("unsupported format %q", format)
}
