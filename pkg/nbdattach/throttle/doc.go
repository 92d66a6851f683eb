// Package throttle limits the I/O a volume's device passes to its
// nbdattach.Backend: IOPS and bytes per second, for reads and writes
// separately, each with an optional burst, changeable while I/O runs.
//
// # Model
//
// The model is QEMU's throttle groups (docs/throttle.txt) with the burst
// length fixed at one second. Each limit is a bucket that fills at its
// average rate (Rate.Avg, units per second) up to a size: Rate.Burst units
// when a burst is set (QEMU's iops-read-max times max-length 1 s), else a
// tenth of a second's worth (QEMU's default). A request is admitted when
// every bucket of its direction holds its cost (one operation; its length in
// bytes), which it then takes. Requests that must wait are served in the
// order they came, per direction (QEMU's queue of throttled requests): only
// the first waits on the buckets, so a large request is not starved by
// small ones taking the tokens as they refill. A request costing more than
// a whole bucket is never split or refused (QEMU neither): it goes when the
// bucket is full and leaves it in debt, which delays the requests after it. Over any
// interval of t seconds a direction therefore passes at most Avg*t + size
// units, plus one such oversized request.
//
// No request is held back longer than MaxHold: the kernel's NBD driver
// fails a request it waited for longer than its I/O timeout. A request
// still held back when its client closes the connection (the kernel does
// on that timeout) is dropped: it has done no I/O (nbdattach.HoldContext).
//
// Reads are ReadAt. Writes are WriteAt, WriteZeroes and Trim; zeroing and
// trimming count as operations but not as bytes, since no payload travels
// (an fstrim of a whole filesystem would otherwise stall every write after
// it for as long as writing that much data would take). Flush and block
// status pass freely.
//
// # Cost when unlimited
//
// A Throttle without limits holds a nil state, and each request costs one
// atomic load and a nil check before it goes to the backend: an unlimited
// volume takes none of the waiting path. Built with the nothrottle tag, Wrap
// returns the backend itself, which is what tests/bench/qos.sh compares
// against.
//
// # Changing limits
//
// Set replaces the whole state at once. Requests waiting under the old
// state wake at once and wait again under the new one, so a change is felt
// by the next request and lifting a limit releases every waiter. The new
// buckets start as full as the old ones were (never above their new size),
// so a change is not a free burst.
package throttle
