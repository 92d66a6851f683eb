package nbd

import (
	"errors"
	"fmt"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// Export is one device the server offers: a Backend plus how it is advertised.
// Fill it in, then hand it to NewServer or ServeTransmission; do not change it
// while it is served.
type Export struct {
	// Name clients ask for (NBD_OPT_GO / EXPORT_NAME). qemu-nbd's default is "".
	Name string
	// Description is sent with NBD_INFO_DESCRIPTION and in NBD_OPT_LIST.
	Description string
	// Backend serves the data. Required.
	Backend nbdattach.Backend
	// ReadOnly refuses WRITE, TRIM and WRITE_ZEROES with EPERM and advertises
	// the export read-only.
	ReadOnly bool
	// NoUnmap keeps storage allocated, as qemu-nbd's default --discard=ignore:
	// TRIM succeeds without reaching the backend and WRITE_ZEROES always
	// passes NoHole.
	NoUnmap bool
	// MultiConn advertises NBD_FLAG_CAN_MULTI_CONN: a FLUSH on one connection
	// covers writes completed on every other one. That holds for any Backend
	// served from one process (Flush makes every completed write durable), so
	// it is a statement about how many clients are expected, as qemu-nbd sets
	// it when more than one client may connect (-e > 1).
	MultiConn bool
	// MinBlock, PreferredBlock and MaxPayload are the block size constraints
	// advertised with NBD_INFO_BLOCK_SIZE. Zero means 1, 4096 and 32 MiB, as
	// qemu-nbd. MinBlock is enforced (offsets and lengths must be multiples)
	// only for clients that asked for block sizes, and for the kernel.
	MinBlock       uint32
	PreferredBlock uint32
	MaxPayload     uint32
	// MaxInFlight bounds the requests of one connection being served at once;
	// the receiver stops reading the socket while the bound is reached. Zero
	// means 64.
	MaxInFlight int
}

func (e *Export) minBlock() uint32 {
	if e.MinBlock == 0 {
		return 1
	}
	return e.MinBlock
}

func (e *Export) preferredBlock() uint32 {
	if e.PreferredBlock == 0 {
		return max(DefaultPreferredBlock, e.minBlock())
	}
	return e.PreferredBlock
}

func (e *Export) maxPayload() uint32 {
	if e.MaxPayload == 0 {
		return DefaultMaxPayload
	}
	return e.MaxPayload
}

func (e *Export) maxInFlight() int {
	if e.MaxInFlight <= 0 {
		return 64
	}
	return e.MaxInFlight
}

// Validate checks the export before it is served: NewServer and
// ServeTransmission call it, and the kernel attach before it configures a
// device.
func (e *Export) Validate() error {
	if e == nil || e.Backend == nil {
		return errors.New("nbd export: no backend")
	}
	if len(e.Name) > maxStringSize || len(e.Description) > maxStringSize {
		return fmt.Errorf("nbd export %q: name or description longer than %d bytes", e.Name, maxStringSize)
	}
	mn, pref, mx := e.minBlock(), e.preferredBlock(), e.maxPayload()
	pow2 := func(v uint32) bool { return v&(v-1) == 0 }
	if !pow2(mn) || mn > 64<<10 || !pow2(pref) || pref < mn || mx < pref || mx%mn != 0 {
		return fmt.Errorf("nbd export %q: block sizes min %d preferred %d max %d are not powers of two with min <= preferred <= max", e.Name, mn, pref, mx)
	}
	return nil
}

// TransmissionFlags are the flags this export advertises (NBD_FLAG_*). The
// kernel attach passes the same value to the nbd driver (NBD_ATTR_SERVER_FLAGS)
// so that the kernel sends exactly the commands ServeTransmission accepts.
func (e *Export) TransmissionFlags() uint16 {
	f := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendDF | tflagSendCache
	if e.ReadOnly {
		f |= tflagReadOnly
	} else {
		f |= tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if e.MultiConn {
		f |= tflagCanMultiConn
	}
	return f
}

// metaContexts lists the metadata contexts the export serves, with the IDs
// qemu-nbd uses for them: base:allocation always (every extent is data when
// the Backend has no BlockStatus), then what a MetaContextProvider offers.
func (e *Export) metaContexts() []metaContext {
	out := []metaContext{{id: metaIDBaseAllocation, name: nbdattach.ContextBaseAllocation}}
	p, ok := e.Backend.(nbdattach.MetaContextProvider)
	if !ok {
		return out
	}
	next := metaIDFirstBitmap
	for _, n := range p.MetaContexts() {
		switch {
		case n == nbdattach.ContextBaseAllocation:
			continue
		case n == nbdattach.ContextAllocationDepth:
			out = append(out, metaContext{id: metaIDAllocationDepth, name: n})
		case len(n) > 0 && len(n) <= maxStringSize && strings.Contains(n, ":"):
			out = append(out, metaContext{id: next, name: n})
			next++
		}
	}
	return out
}

// metaContext is a context the export serves, and its ID on the wire.
type metaContext struct {
	id   uint32
	name string
}
