package kernel

import (
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/nbd"
)

// kernelExport describes b the way the kernel attach serves it: the
// kernel's block size is enforced on every request (the kernel never sends
// less, so anything else is a bug worth refusing), and CAN_MULTI_CONN is
// always advertised because every socket of a device is served by this one
// process, where Flush covers the writes of all of them; the kernel refuses
// a second socket without it.
func kernelExport(b nbdattach.Backend, readOnly bool, blockSize uint32) *nbd.Export {
	return &nbd.Export{Backend: b, ReadOnly: readOnly, MultiConn: true, MinBlock: blockSize}
}
