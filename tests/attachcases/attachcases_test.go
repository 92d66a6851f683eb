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
