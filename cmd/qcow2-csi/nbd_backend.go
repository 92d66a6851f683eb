package main

import (
	"errors"
	"fmt"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
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
		return nil, nil, fmt.Errorf("%s: qcow2 images are not served by this build yet (pkg/qcow2 has not landed); use -f raw for raw files", o.file)
	}
	return nil, nil, fmt.Errorf("unsupported format %q", format)
}
