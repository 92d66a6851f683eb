// Package driver implements the qcow2-csi CSI services (Identity, Controller,
// Node) on top of a node-local pool of qcow2 images.
//
// # Model
//
// A volume is <pool>/<volume-id>.qcow2 plus <pool>/<volume-id>.json, its
// metadata. The metadata file is written atomically (temporary file, fsync,
// rename, fsync of the directory) and is the commit point: a volume exists if
// and only if its metadata file does. Anything else found in the pool on start
// (temporary files, images without metadata) is the remains of an operation a
// crash interrupted and is removed, so a restart never leaks files nor loses a
// committed volume.
//
// Volume IDs are derived from the CSI volume name by a hash, so that a retried
// CreateVolume finds the volume it made before, even across restarts, without
// any name index. IDs coming from requests are validated (character set,
// length) before any path is built from them.
//
// # Concurrency
//
// Every volume-scoped RPC first takes the volume's operation lock (oplock.go),
// which states in one table which operations exclude each other; a conflicting
// request is answered Aborted at once and the CO retries. There is no global
// lock around I/O.
//
// A group snapshot (group*.go, docs/group-snapshots.md) is the one place I/O
// is held on purpose: on prepare a node takes its members' snapshot locks
// and pauses their gates (gate.go, which every attach path passes), on
// commit it takes their snapshots through the path CreateSnapshot uses, and
// a timer of its own releases them at the deadline whatever the controller
// does.
//
// # Seams
//
// The driver reaches the outside world through narrow interfaces injected by
// the constructor: Images (the qcow2 library), nbdattach.Attacher (kernel NBD
// or FUSE+loop) and Mounter (k8s.io/mount-utils). Tests swap them; `qcow2-csi
// serve` wires the real ones. What not every Images can do is an optional
// capability it implements: GrowthReporter (expansion) and SnapshotImages
// (internal snapshots, hence CSI snapshots and the SnapshotMetadata service).
// Every image the driver opens, for I/O or for a snapshot, goes through
// Images.Open.
//
// # Errors
//
// Internal functions return errors wrapping the sentinels in status.go or
// those of the domain packages. status.go says once what each domain
// sentinel means to the driver (meanings): driverErr applies that where the
// driver's logic tests for it, and toStatus, at the RPC boundary only, maps
// both kinds to gRPC codes through one table.
package driver
