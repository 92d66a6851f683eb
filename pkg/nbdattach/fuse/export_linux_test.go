package fuse

// SparseRaw is a new raw file of the size, none of it allocated;
// SparseBackend the same open as a Backend until the test ends.
var (
	SparseRaw     = sparseRaw
	SparseBackend = sparseBackend
)

// ServesOverUring reports whether the attacher's FUSE server, while one is
// mounted, has the kernel's requests over io_uring.
func ServesOverUring(a *Attacher) bool {
	a.srvMu.Lock()
	defer a.srvMu.Unlock()
	return a.srv != nil && a.srv.uring != nil
}

// UringServed is how many requests the attacher's mounted server answered
// over io_uring (0 without one).
func UringServed(a *Attacher) int64 {
	a.srvMu.Lock()
	defer a.srvMu.Unlock()
	if a.srv == nil || a.srv.uring == nil {
		return 0
	}
	return a.srv.uring.served.Load()
}
