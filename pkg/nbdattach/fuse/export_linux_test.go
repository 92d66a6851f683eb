package fuse

// ServesOverUring reports whether the attacher's FUSE server, while one is
// mounted, has the kernel's requests over io_uring.
func ServesOverUring(a *Attacher) bool {
	a.srvMu.Lock()
	defer a.srvMu.Unlock()
	return a.srv != nil && a.srv.uring != nil
}
