package nbd

// Wire constants of the NBD protocol (doc/proto.md in the NBD project), named
// in Go style. All integers on the wire are big-endian.

// Handshake magics.
const (
	nbdMagic        uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic        uint64 = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic   uint64 = 0x0003e889045565a9
	requestMagic    uint32 = 0x25609513
	simpleMagic     uint32 = 0x67446698
	structuredMagic uint32 = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	clientFlagFixedNewstyle uint32 = 1 << 0
	clientFlagNoZeroes      uint32 = 1 << 1
)

// Transmission flags, advertised per export.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagRotational      uint16 = 1 << 4
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendResize      uint16 = 1 << 9
	tflagSendCache       uint16 = 1 << 10
	tflagSendFastZero    uint16 = 1 << 11
)

// Options.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
)

// Option reply types; errors have bit 31 set.
const (
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4

	repErrUnsup         uint32 = 1<<31 + 1
	repErrPolicy        uint32 = 1<<31 + 2
	repErrInvalid       uint32 = 1<<31 + 3
	repErrPlatform      uint32 = 1<<31 + 4
	repErrTLSReqd       uint32 = 1<<31 + 5
	repErrUnknown       uint32 = 1<<31 + 6
	repErrShutdown      uint32 = 1<<31 + 7
	repErrBlockSizeReqd uint32 = 1<<31 + 8
	repErrTooBig        uint32 = 1<<31 + 9
)

// Info types for NBD_OPT_INFO and NBD_OPT_GO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Commands.
const (
	nbdCmdRead        uint16 = 0
	nbdCmdWrite       uint16 = 1
	nbdCmdDisc        uint16 = 2
	nbdCmdFlush       uint16 = 3
	nbdCmdTrim        uint16 = 4
	nbdCmdCache       uint16 = 5
	nbdCmdWriteZeroes uint16 = 6
	nbdCmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply chunk flags and types.
const (
	replyFlagDone uint16 = 1 << 0

	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeOffsetHole  uint16 = 2
	replyTypeBlockStatus uint16 = 5
	replyTypeError       uint16 = 1<<15 + 1
	replyTypeErrorOffset uint16 = 1<<15 + 2
)

// Error values carried in replies (fixed by the protocol, not the host's
// errno numbering).
const (
	nbdEPERM     uint32 = 1
	nbdEIO       uint32 = 5
	nbdENOMEM    uint32 = 12
	nbdEINVAL    uint32 = 22
	nbdENOSPC    uint32 = 28
	nbdEOVERFLOW uint32 = 75
	nbdENOTSUP   uint32 = 95
	nbdESHUTDOWN uint32 = 108
)

// Context IDs qemu-nbd gives the metadata contexts on the wire
// (base:allocation 0, qemu:allocation-depth 1, dirty bitmaps from 2 in the
// order the export lists them), so that traces compare line by line.
const (
	metaIDBaseAllocation  uint32 = 0
	metaIDAllocationDepth uint32 = 1
	metaIDFirstBitmap     uint32 = 2
)

// Sizes and limits.
const (
	requestHeaderSize    = 28
	simpleReplySize      = 16
	structuredHeaderSize = 20
	// maxStringSize is the spec's cap on names, descriptions and queries.
	maxStringSize = 4096
	// maxOptionSize bounds the option payload a client may send; anything
	// larger is refused with NBD_REP_ERR_TOO_BIG, never allocated.
	maxOptionSize = 64 << 10
	// maxOptionDrain bounds what is drained of a refused payload so that
	// the negotiation can go on, as the spec asks of a server. A client
	// claiming more is after the connection slot, not an answer (the
	// spec lets a server hard-disconnect a denial of service): it gets
	// the error reply and the connection ends, before any of it is read.
	maxOptionDrain = 1 << 20
	// maxMetaQueries bounds the number of queries in one meta context option.
	maxMetaQueries = 128
	// DefaultMaxPayload is the largest READ/WRITE payload advertised,
	// as qemu-nbd (32 MiB).
	DefaultMaxPayload = 32 << 20
	// DefaultPreferredBlock is the preferred block size advertised.
	DefaultPreferredBlock = 4096
	// maxExtentsPerReply bounds one BLOCK_STATUS reply.
	maxExtentsPerReply = 1 << 16
)
