package kernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
)

// attr is one decoded netlink attribute, nested ones flattened with their
// parent's type as prefix so a test can compare a whole message at once.
type attr struct {
	path string
	data []byte
}

func flatten(t *testing.T, b []byte, prefix string, nested map[string]bool) []attr {
	t.Helper()
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		t.Fatal(err)
	}
	var out []attr
	for ad.Next() {
		p := prefix + "/" + itoa(int(ad.Type()))
		if nested[p] {
			if ad.TypeFlags()&netlink.Nested == 0 {
				t.Errorf("attribute %s lacks NLA_F_NESTED", p)
			}
			out = append(out, flatten(t, ad.Bytes(), p, nested)...)
			continue
		}
		out = append(out, attr{p, append([]byte(nil), ad.Bytes()...)})
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func itoa(i int) string { return fmt.Sprintf("%02d", i) }

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }

func TestNLConfigEncode(t *testing.T) {
	nested := map[string]bool{"/07": true, "/07/01": true}
	tests := []struct {
		name string
		cfg  nlConfig
		want []attr
	}{
		{
			name: "connect",
			cfg: nlConfig{index: -1, size: 1 << 30, blockSize: 4096, timeout: 1500 * time.Millisecond,
				deadConnTimeout: 2 * time.Minute, serverFlags: 0x16d, sockets: []int{7, 9}, backendID: "pvc-1"},
			want: []attr{
				{"/02", u64(1 << 30)},
				{"/03", u64(4096)},
				{"/04", u64(2)}, // 1.5 s rounds up: never to "no timeout"
				{"/08", u64(120)},
				{"/05", u64(0x16d)},
				{"/07/01/01", u32(7)},
				{"/07/01/01", u32(9)},
				{"/10", []byte("pvc-1\x00")},
			},
		},
		{
			name: "reconfigure sockets",
			cfg:  nlConfig{index: 3, sockets: []int{5}, backendID: "v"},
			want: []attr{
				{"/01", u32(3)},
				{"/07/01/01", u32(5)},
				{"/10", []byte("v\x00")},
			},
		},
		{
			name: "resize",
			cfg:  nlConfig{index: 0, size: 2 << 30, backendID: "v"},
			want: []attr{
				{"/01", u32(0)},
				{"/02", u64(2 << 30)},
				{"/10", []byte("v\x00")},
			},
		},
		{
			name: "index only",
			cfg:  nlConfig{index: 12},
			want: []attr{{"/01", u32(12)}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := tt.cfg.encode()
			if err != nil {
				t.Fatal(err)
			}
			got := flatten(t, b, "", nested)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("attributes\n got %v\nwant %v", got, tt.want)
			}
		})
	}
}

func TestNLConfigEncodeExactBytes(t *testing.T) {
	b, err := nlConfig{index: 1}.encode()
	if err != nil {
		t.Fatal(err)
	}
	// struct nlattr {u16 nla_len; u16 nla_type} + u32 payload, host order.
	want := binary.NativeEndian.AppendUint16(nil, 8)
	want = binary.NativeEndian.AppendUint16(want, nlAttrIndex)
	want = binary.NativeEndian.AppendUint32(want, 1)
	if !bytes.Equal(b, want) {
		t.Errorf("got % x, want % x", b, want)
	}
}

func TestNLConfigEncodeRejects(t *testing.T) {
	tests := []struct {
		name string
		cfg  nlConfig
		want string
	}{
		{"newline in id", nlConfig{index: -1, backendID: "a\nb"}, "NUL or newline at byte 1"},
		{"NUL in id", nlConfig{index: -1, backendID: "ab\x00"}, "NUL or newline at byte 2"},
		{"long id", nlConfig{index: -1, backendID: strings.Repeat("x", maxBackendIDLen+1)}, "exceeds 1024"},
		{"negative fd", nlConfig{index: -1, sockets: []int{-1}}, "invalid socket fd -1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.cfg.encode()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestDecodeStatus(t *testing.T) {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(nlAttrDeviceList, func(l *netlink.AttributeEncoder) error {
		for _, d := range []struct {
			i uint32
			c uint8
		}{{0, 1}, {1, 0}, {15, 1}} {
			l.Nested(nlDeviceItem, func(it *netlink.AttributeEncoder) error {
				it.Uint32(nlDeviceIndex, d.i)
				it.Uint8(nlDeviceConnected, d.c)
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeStatus(b)
	if err != nil {
		t.Fatal(err)
	}
	want := []nlStatus{{0, true}, {1, false}, {15, true}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}

	bad := netlink.NewAttributeEncoder()
	bad.Nested(nlAttrDeviceList, func(l *netlink.AttributeEncoder) error {
		l.Nested(nlDeviceItem, func(it *netlink.AttributeEncoder) error {
			it.Uint8(nlDeviceConnected, 1)
			return nil
		})
		return nil
	})
	b, _ = bad.Encode()
	if _, err := decodeStatus(b); err == nil || !strings.Contains(err.Error(), "without an index") {
		t.Errorf("item without index: err = %v", err)
	}
	if _, err := decodeStatus([]byte{1, 2, 3}); err == nil {
		t.Error("truncated attribute: no error")
	}
}

func TestDecodeIndex(t *testing.T) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nlAttrIndex, 7)
	b, _ := ae.Encode()
	if i, err := decodeIndex(b); err != nil || i != 7 {
		t.Errorf("got %d, %v; want 7", i, err)
	}
	if _, err := decodeIndex(nil); err == nil {
		t.Error("empty reply: no error")
	}
}

func TestChooseBlockSize(t *testing.T) {
	tests := []struct {
		size    int64
		asked   uint32
		want    uint32
		wantErr string
	}{
		{1 << 30, 0, 4096, ""},
		{1<<30 + 512, 0, 512, ""},
		{1 << 30, 512, 512, ""},
		{1 << 30, 1024, 1024, ""},
		{1<<30 + 512, 4096, 0, "not a multiple of the block size 4096"},
		{1<<30 + 1, 0, 0, "not a multiple of the block size 512"},
		{1 << 30, 3000, 0, "not a power of two"},
		{1 << 30, 8192, 0, "not a power of two between 512 and 4096"},
		{0, 0, 0, "not positive"},
	}
	for _, tt := range tests {
		got, err := chooseBlockSize(tt.size, tt.asked)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("chooseBlockSize(%d, %d) err = %v, want %q", tt.size, tt.asked, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("chooseBlockSize(%d, %d) = %d, %v; want %d", tt.size, tt.asked, got, err, tt.want)
		}
	}
}

// writeTree makes a fake sysfs: path -> content.
func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, c := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestReadSysDevices(t *testing.T) {
	root := writeTree(t, map[string]string{
		"block/nbd0/size":        "2097152\n",
		"block/nbd0/pid":         "4242\n",
		"block/nbd0/backend":     "pvc-0a1b\n",
		"block/nbd0/nbd0p1/size": "2048\n",
		"block/nbd1/size":        "0\n",
		"block/nbd10/size":       "8\n",
		"block/nbd10/pid":        "17\n",
		"block/nbd2/size":        "16\n",
		"block/nbd2/backend":     "id with spaces\n",
		"block/loop0/size":       "0\n",
		"block/nbd0p1/size":      "2048\n",
		"block/nbdx/size":        "0\n",
		"block/nbd01/size":       "0\n",
	})
	got, err := readSysDevices(root)
	if err != nil {
		t.Fatal(err)
	}
	want := []sysDevice{
		{index: 0, backendID: "pvc-0a1b", pid: 4242, size: 1 << 30},
		{index: 1},
		{index: 2, backendID: "id with spaces", size: 8192},
		{index: 10, pid: 17, size: 4096},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	for _, tt := range []struct {
		id    string
		index int
		ok    bool
	}{{"pvc-0a1b", 0, true}, {"id with spaces", 2, true}, {"pvc-0a1", 0, false}, {"", 0, false}} {
		d, ok := findByBackendID(got, tt.id)
		if ok != tt.ok || (ok && d.index != tt.index) {
			t.Errorf("findByBackendID(%q) = %d, %v; want %d, %v", tt.id, d.index, ok, tt.index, tt.ok)
		}
	}
}

func TestReadSysDevicesErrors(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
		want  string
	}{
		{"garbage size", map[string]string{"block/nbd0/size": "lots\n"}, `"lots" is not a number`},
		{"garbage pid", map[string]string{"block/nbd0/size": "0\n", "block/nbd0/pid": "-\n"}, `"-" is not a number`},
		{"huge size", map[string]string{"block/nbd0/size": "36028797018963968\n"}, "out of range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := readSysDevices(writeTree(t, tt.files))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	if _, err := readSysDevices(filepath.Join(t.TempDir(), "none")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing sysfs: err = %v", err)
	}
}

func TestParseNBDName(t *testing.T) {
	for name, want := range map[string]int{"nbd0": 0, "nbd7": 7, "nbd123": 123} {
		if got, ok := parseNBDName(name); !ok || got != want {
			t.Errorf("parseNBDName(%q) = %d, %v", name, got, ok)
		}
	}
	for _, name := range []string{"nbd", "nbd0p1", "nbd-1", "nbd01", "loop0", "xnbd0", "nbd+1"} {
		if _, ok := parseNBDName(name); ok {
			t.Errorf("parseNBDName(%q) accepted", name)
		}
	}
}

// FuzzDecodeNetlink feeds arbitrary attribute payloads to the decoders of
// the kernel's replies: errors are fine, panics are not.
func FuzzDecodeNetlink(f *testing.F) {
	seed := netlink.NewAttributeEncoder()
	seed.Uint32(nlAttrIndex, 3)
	seed.Nested(nlAttrDeviceList, func(l *netlink.AttributeEncoder) error {
		l.Nested(nlDeviceItem, func(it *netlink.AttributeEncoder) error {
			it.Uint32(nlDeviceIndex, 3)
			it.Uint8(nlDeviceConnected, 1)
			return nil
		})
		return nil
	})
	b, err := seed.Encode()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte{})
	f.Add([]byte{4, 0, 9, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		sts, err := decodeStatus(b)
		if err == nil {
			for _, st := range sts {
				if st.index < 0 {
					t.Fatalf("decoded a negative index from %x", b)
				}
			}
		}
		if i, err := decodeIndex(b); err == nil && i < 0 {
			t.Fatalf("decoded a negative index from %x", b)
		}
	})
}
