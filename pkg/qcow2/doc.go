// Package qcow2 reads and writes QEMU qcow2 images (version 2 and 3) in pure
// Go, compatible with qemu-img, qemu-io and qemu-nbd 7.2 in both directions.
//
// # Model
//
// Clusters. The file is divided into clusters (512 B to 2 MiB, a power of
// two). The guest disk is divided into clusters of the same size. Cluster 0
// holds the header and its extensions.
//
// L1/L2. A guest cluster is found through a two-level table: the L1 table
// (one entry per L2 table) and L2 tables (one cluster each, one entry per
// guest cluster). An L2 entry says the cluster is unallocated (read the
// backing file, or zeroes), reads as zeroes (v3 zero flag), holds data at a
// host offset, or holds compressed data (zlib/raw deflate or zstd). With
// extended L2 entries (incompatible bit 4) each entry has a second word
// with 32 allocated/zero bits, one per subcluster.
//
// Refcounts. Every host cluster has a reference count (1 to 64 bits wide)
// stored in refcount blocks found through the refcount table. A cluster is
// free when its count is zero. A count is the number of references: one
// per L1 table that reaches a data cluster or an L2 table, plus one for
// every metadata structure stored in it.
//
// COPIED flag. Bit 63 of L1 and L2 entries is set exactly when the
// referenced cluster's refcount is one: it may then be written in place.
// Otherwise (the cluster is shared with an internal snapshot) a write
// copies it first (copy-on-write) and drops one reference from the old one.
//
// Snapshots. An internal snapshot is a copy of the L1 table; creating one
// increments the refcount of every cluster the active L1 reaches and
// clears COPIED flags. The snapshot table is decoded here; creating,
// applying and deleting snapshots lives in snapshot*.go.
//
// Bitmaps. Persistent dirty bitmaps (bitmaps extension, autoclear bit 0)
// are decoded here and counted as references; tracking writes in them
// lives in bitmap*.go. Until that code sets Image.bitmapsTracked, the first
// write clears the autoclear bit so stale bitmaps are never trusted.
//
// Encryption. An image with crypt_method 2 (LUKS) keeps a LUKS1 header and
// its key slots in clusters named by the full disk encryption header
// extension, and its data clusters encrypted per 512-byte sector with the
// host offset as tweak; metadata stays clear (luks*.go).
//
// # Crash safety
//
// Metadata is updated in qemu's order: a refcount increment is durable
// before an L2 entry points to the cluster; a new L2 table is durable before
// its L1 entry; refcount decrements are applied only after the L1/L2
// updates that dropped the reference are durable (so freed clusters are
// never reused while something on disk still points to them). Flush makes
// all of it, and the data, durable. With lazy_refcounts the dirty bit is
// set before the first write and refcounts may lag; opening such an image
// read-write after a crash rebuilds the refcounts from all references.
// Every metadata write is checked against the known metadata first; an
// overlap sets the corrupt bit and makes the image read-only. Images with
// the corrupt bit open read-only only.
//
// # Concurrency
//
// An Image is safe for concurrent use. Requests hold Image.drain shared and
// lock the guest clusters they touch (shared for reads, exclusive for
// writes) in Image.ranges; the metadata lock Image.mu is held only while
// mapping or updating tables, never during data I/O, so I/O to different
// clusters proceeds in parallel.
//
// # Internals for code that extends Image (snapshots, resize, bitmaps, check)
//
// Locking rules:
//   - Operations on the whole image (create/apply/delete snapshot, resize,
//     amend, check/repair, bitmap add/remove) take img.drain.Lock() first:
//     that waits for in-flight I/O and blocks new I/O. Then img.mu.Lock().
//   - Everything that reads or changes tables (l1, L2 cache, refcount cache,
//     refTable, snapshots, bitmapDir, metaMap, hdr, size) needs img.mu.
//   - Never do guest data I/O while holding img.mu; never take drain while
//     holding mu.
//
// Methods to build on (all need img.mu held):
//   - getL2(vc) / setL2(vc, e, bm): read / write one L2 entry through the
//     cache; setL2 allocates or copies (COW) the L2 table as needed.
//     classify(e, bm, sc, where) validates and classifies an entry.
//   - l2ForWrite(i1): writable L2 table for an L1 index. writeL1Entry(i, e).
//     readL2Table(off), readL1Table(off, n): whole tables incl. unflushed
//     cache contents.
//   - allocClusters(n): n contiguous clusters with refcount 1.
//     getRefcount(ci), addRefcount(ci, delta) (ci = host cluster index);
//     freeLater(off, n, punch): decrement once the metadata that dropped
//     the reference is durable (applied by flushLocked); freeNow(off, n):
//     decrement now (nothing durable references the range).
//   - flushLocked(data): write caches in the crash-safe order and fsync.
//     syncRefcounts(sync), fsync(), writeHeader() (rewrites cluster 0 from
//     img.hdr, including extensions), growLocked(size), growL1(n).
//     After changing img.size call sizeCaches() (default cache sizes
//     follow the disk size).
//   - checkOverlap(off, n, kind) before writing metadata of a given kind;
//     update img.metaMap (host cluster index -> metaKind) when metadata
//     clusters are allocated or freed; buildMetaMap() recomputes it.
//   - walkReferences(opts, fn): every reference to host space (header, L1s,
//     L2s, data, compressed ranges, snapshot table, bitmap directory,
//     tables and data, optionally refcount structures), with the L1/L2
//     index and raw entry (refwalk.go); countReferences() turns it into
//     expected refcounts. rebuildRefcountStructure(counts, end, placement)
//     (refrebuild.go) writes fresh refcount structures from counts, appended
//     (the repair of dirty lazy-refcount images, amend's refcount width) or
//     in the first free gaps (check's rebuild); commitRefTable(off, table)
//     is the one switch of the header to a new refcount table.
//   - writeHooks: funcs called with (off, n) for every guest range
//     written, zeroed or discarded (mu held), for dirty bitmaps.
//   - After changing a data cluster's refcount between 1 and >1, callers
//     must update the COPIED flag of the active L2 entry (and L1 for L2
//     tables) themselves.
package qcow2
