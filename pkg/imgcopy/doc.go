// Package imgcopy copies a disk from one image to another: the engine behind
// `qcow2-csi img convert` and behind the copy path of a snapshot restore.
//
// The source's block status decides what is read: ranges that read as zeroes
// (or are allocated nowhere) are skipped on a fresh target, which reads as
// zeroes already, and zeroed on an existing one (qemu-img convert -n). The
// rest is cut into units aligned to the unit size, so that a compressed
// cluster is never split between two units. Several workers read units in
// parallel; writes land in source order, one unit after the other, as
// qemu-img convert does without -W: parallel buffered writes to one file
// contend on its inode lock and end up slower, and an in-order target grows
// sequentially.
//
// Inside a unit of data, runs of zero bytes at the sparse granularity are not
// written (qemu-img convert -S), and with compression every cluster is
// written compressed unless it is all zeroes.
//
// The package knows images only through two small interfaces, Source and
// Target: a *qcow2.Image and a *qcow2.SnapshotView are sources, a
// *qcow2.Image is a target, and FileTarget makes a raw file one.
package imgcopy
