// Package interop checks the `qcow2-csi img` face against qemu-img 7.2 on
// the same files: same JSON, same exit codes, images usable by each other.
package interop
