//go:build !linux

package mntns

// Isolate does nothing where there are no mount namespaces.
func Isolate() {}
