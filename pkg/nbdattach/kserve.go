package nbdattach

// kernelExport describes b the way the kernel attach serves it: the
// kernel's block size is enforced on every request (the kernel never sends
// less, so anything else is a bug worth refusing), and CAN_MULTI_CONN is
// always advertised because every socket of a device is served by this one
// process, where Flush covers the writes of all of them; the kernel refuses
// a second socket without it.
func kernelExport(b Backend, readOnly bool, blockSize uint32) *Export {
	return &Export{Backend: b, ReadOnly: readOnly, MultiConn: true, MinBlock: blockSize}
}
