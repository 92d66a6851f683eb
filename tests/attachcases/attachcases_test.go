package attachcases

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// copySparse is SaveDevice's fallback where cp has no --sparse: same bytes,
// zero blocks left as holes.
func TestCopySparse(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	data := make([]byte, 3<<20+4096) // not a multiple of the buffer
	copy(data[100:], "head")
	copy(data[2<<20:], bytes.Repeat([]byte{7}, 64<<10))
	copy(data[len(data)-10:], "tail")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "dst")
	if err := copySparse(src, dst); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, data); i >= 0 {
		t.Fatalf("copy differs at byte %d (len %d, want %d)", i, len(got), len(data))
	}
	// Three 64 KiB blocks hold data; a file system with holes stores only
	// those (one with coarser allocation may store a little more).
	n, err := allocatedBytes(dst, 0, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if n < 3*64<<10-60<<10 || n > 1<<20 {
		t.Fatalf("copy allocates %d bytes, want about %d", n, 3*64<<10)
	}
}

// sameContents is Raw's Equal: it names the first differing byte and
// notices a size difference, also at a chunk boundary.
func TestSameContents(t *testing.T) {
	dir := t.TempDir()
	base := bytes.Repeat([]byte("0123456789abcdef"), (2<<20)/16)
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a := write("a", base)
	changed := append([]byte(nil), base...)
	changed[1<<20+5] ^= 1
	tests := []struct {
		name, other, wantErr string
	}{
		{"equal", write("same", base), ""},
		{"one byte", write("changed", changed), "byte 1048581 differs"},
		{"shorter at a chunk boundary", write("short", base[:1<<20]), "sizes differ: one ends at byte 1048576"},
		{"longer by a few bytes", write("long", append(append([]byte(nil), base...), 1, 2)), "sizes differ: one ends at byte 2097152"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := sameContents(a, tc.other)
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tc.wantErr {
				t.Fatalf("sameContents: %q, want %q", got, tc.wantErr)
			}
		})
	}
}
