package kernel

import (
	"errors"
	"fmt"
	"time"

	"github.com/mdlayher/netlink"
)

// The kernel NBD driver's generic netlink family, as include/uapi/linux/
// nbd-netlink.h defines it. The numbering is ABI: it never changes.
const (
	nlFamilyName = "nbd"
	nlVersion    = 1

	nlCmdConnect     = 1
	nlCmdDisconnect  = 2
	nlCmdReconfigure = 3
	nlCmdLinkDead    = 4
	nlCmdStatus      = 5

	nlAttrIndex             = 1  // u32
	nlAttrSizeBytes         = 2  // u64
	nlAttrBlockSizeBytes    = 3  // u64
	nlAttrTimeout           = 4  // u64, seconds
	nlAttrServerFlags       = 5  // u64, the NBD transmission flags
	nlAttrClientFlags       = 6  // u64, nlClientFlag*
	nlAttrSockets           = 7  // nested nlSockItem
	nlAttrDeadConnTimeout   = 8  // u64, seconds
	nlAttrDeviceList        = 9  // nested nlDeviceItem (STATUS reply)
	nlAttrBackendIdentifier = 10 // string, shown in /sys/block/nbdN/backend

	nlSockItem = 1 // nested in nlAttrSockets
	nlSockFD   = 1 // u32, in nlSockItem

	nlDeviceItem      = 1 // nested in nlAttrDeviceList
	nlDeviceIndex     = 1 // u32, in nlDeviceItem
	nlDeviceConnected = 2 // u8, in nlDeviceItem

	// No client flag is set: NBD_CFLAG_DESTROY_ON_DISCONNECT would free the
	// device index on disconnect, but a device that stays lets List see it
	// and keeps the /dev/nbdN names stable across a plugin restart; and
	// NBD_CFLAG_DISCONNECT_ON_CLOSE would disconnect when the last opener
	// closes /dev/nbdN, but a mounted filesystem is that opener and the
	// device must outlive any single open.
)

// kernelFlagCanMultiConn is NBD_FLAG_CAN_MULTI_CONN: the kernel refuses
// more than one socket per device unless the export advertises it.
const kernelFlagCanMultiConn = 1 << 8

// maxBackendIDLen bounds the identifier recorded with a device. The kernel
// copies it whole into sysfs (one page); volume IDs are far shorter.
const maxBackendIDLen = 1024

// nlConfig is one CONNECT or RECONFIGURE request. Zero fields are left out,
// so the kernel keeps (or defaults) them.
type nlConfig struct {
	// index is the device number; -1 lets CONNECT pick a free device.
	index           int
	size            uint64
	blockSize       uint64
	timeout         time.Duration
	deadConnTimeout time.Duration
	serverFlags     uint64
	sockets         []int
	backendID       string
}

// seconds rounds d up to whole seconds: the kernel takes both timeouts in
// seconds and a sub-second timeout must not become "no timeout".
func seconds(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Second - 1) / time.Second)
}

// encode builds the attribute payload of a CONNECT or RECONFIGURE message.
func (c nlConfig) encode() ([]byte, error) {
	if c.backendID != "" {
		if err := validBackendID(c.backendID); err != nil {
			return nil, err
		}
	}
	ae := netlink.NewAttributeEncoder()
	if c.index >= 0 {
		ae.Uint32(nlAttrIndex, uint32(c.index))
	}
	if c.size != 0 {
		ae.Uint64(nlAttrSizeBytes, c.size)
	}
	if c.blockSize != 0 {
		ae.Uint64(nlAttrBlockSizeBytes, c.blockSize)
	}
	if s := seconds(c.timeout); s != 0 {
		ae.Uint64(nlAttrTimeout, s)
	}
	if s := seconds(c.deadConnTimeout); s != 0 {
		ae.Uint64(nlAttrDeadConnTimeout, s)
	}
	if c.serverFlags != 0 {
		ae.Uint64(nlAttrServerFlags, c.serverFlags)
	}
	if len(c.sockets) > 0 {
		ae.Nested(nlAttrSockets, func(nae *netlink.AttributeEncoder) error {
			for _, fd := range c.sockets {
				if fd < 0 {
					return fmt.Errorf("nbd netlink: invalid socket fd %d", fd)
				}
				nae.Nested(nlSockItem, func(s *netlink.AttributeEncoder) error {
					s.Uint32(nlSockFD, uint32(fd))
					return nil
				})
			}
			return nil
		})
	}
	if c.backendID != "" {
		ae.String(nlAttrBackendIdentifier, c.backendID)
	}
	return ae.Encode()
}

// validBackendID rejects identifiers that sysfs could not show back
// unambiguously (the kernel prints "%s\n"), so List and Reattach find
// exactly what Attach recorded.
func validBackendID(id string) error {
	if id == "" {
		return errors.New("nbd: empty device identifier")
	}
	if len(id) > maxBackendIDLen {
		return fmt.Errorf("nbd: device identifier of %d bytes exceeds %d", len(id), maxBackendIDLen)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c == 0 || c == '\n' {
			return fmt.Errorf("nbd: device identifier %q contains a NUL or newline at byte %d", id, i)
		}
	}
	return nil
}

// nlStatus is one device of a STATUS reply.
type nlStatus struct {
	index     int
	connected bool
}

// decodeIndex reads the device index from a CONNECT reply.
func decodeIndex(b []byte) (int, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, fmt.Errorf("nbd netlink: connect reply: %w", err)
	}
	index := -1
	for ad.Next() {
		if ad.Type() == nlAttrIndex {
			index = int(ad.Uint32())
		}
	}
	if err := ad.Err(); err != nil {
		return 0, fmt.Errorf("nbd netlink: connect reply: %w", err)
	}
	if index < 0 {
		return 0, errors.New("nbd netlink: connect reply has no device index")
	}
	return index, nil
}

// decodeStatus reads a STATUS reply: the device list, each item an index
// and whether the kernel holds a configuration for it.
func decodeStatus(b []byte) ([]nlStatus, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, fmt.Errorf("nbd netlink: status reply: %w", err)
	}
	var out []nlStatus
	for ad.Next() {
		if ad.Type() != nlAttrDeviceList {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != nlDeviceItem {
					continue
				}
				st := nlStatus{index: -1}
				list.Nested(func(item *netlink.AttributeDecoder) error {
					for item.Next() {
						switch item.Type() {
						case nlDeviceIndex:
							st.index = int(item.Uint32())
						case nlDeviceConnected:
							st.connected = item.Uint8() != 0
						}
					}
					return item.Err()
				})
				if st.index < 0 {
					return errors.New("device item without an index")
				}
				out = append(out, st)
			}
			return list.Err()
		})
	}
	if err := ad.Err(); err != nil {
		return nil, fmt.Errorf("nbd netlink: status reply: %w", err)
	}
	return out, nil
}
