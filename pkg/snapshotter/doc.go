// Package snapshotter is the CSI snapshot model on qcow2 images.
//
// A CSI snapshot is an internal qcow2 snapshot of the volume's image plus a
// checkpoint: a persistent dirty bitmap that starts recording writes when
// the snapshot is taken. Snapshots carry a sequence number (chosen by the
// caller, strictly increasing per image, e.g. creation time in nanoseconds)
// that also names their bitmap, "qcow2-csi-cbt-<seq>". Taking S(i+1) adds
// its bitmap first, then takes the internal snapshot, then disables B(i), so
// every write is recorded in the bitmap of the span it falls in (a write
// racing with the snapshot lands in both neighbours: a superset, never a
// gap).
//
// delta(S(i), S(j)) is the union of the bitmaps with sequence numbers in
// [i, j). Deleting S(k) merges B(k) into its predecessor and removes it, so
// the bitmaps always partition time from the oldest one on: a delta whose
// base was deleted starts at the bitmap whose span contains the base's
// sequence number, which only makes it larger. The oldest bitmap has no
// predecessor and stays when its snapshot goes.
//
// A bitmap the library reports inconsistent (found in use after a crash, or
// unusable) poisons every delta across its span: Delta then returns
// ErrUntrusted and the caller makes a full backup. The package never returns
// a delta that misses a change it cannot vouch for.
//
// Restore and clone make a new image: a reflink (FICLONE) of a closed image
// followed by revert and dropping the other snapshots and bitmaps where the
// file system supports it, otherwise a copy of the snapshot's allocated
// clusters only, with the copy engine img convert uses (pkg/imgcopy).
package snapshotter
