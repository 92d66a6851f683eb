package qcow2

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// checkSeeds are the testdata images plus, for each, copies with the first
// refcount table entry and the first L1 entry given reserved or
// unreachable bits: the damage that once made the check walk panic.
func checkSeeds(f *testing.F) [][]byte {
	var out [][]byte
	for _, b := range seedFiles(f) {
		out = append(out, b)
		if len(b) < headerV2Len {
			continue
		}
		for _, field := range []int{hdrRefcountTableOffset, hdrL1TableOffset} {
			at := binary.BigEndian.Uint64(b[field:])
			for _, bits := range []uint64{1 << 63, 1 << 56, 1} {
				if at+8 > uint64(len(b)) {
					continue
				}
				c := append([]byte(nil), b...)
				e := binary.BigEndian.Uint64(c[at:])
				binary.BigEndian.PutUint64(c[at:], e|bits)
				out = append(out, c)
			}
		}
	}
	return out
}

func writeFuzzImage(t *testing.T, b []byte) string {
	p := filepath.Join(t.TempDir(), "f.qcow2")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// FuzzCheck: checking a hostile image never panics, and a result always
// comes back (an error is a check error, exit code 1).
func FuzzCheck(f *testing.F) {
	for _, b := range checkSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		img, err := OpenForCheck(writeFuzzImage(t, b), OpenOptions{ReadOnly: true, NoLock: true, NoBacking: true})
		if err != nil {
			return
		}
		defer img.Close()
		res, err := img.Check(RepairNone)
		if res == nil {
			t.Fatalf("Check returned no result (err %v)", err)
		}
		if err == nil && res.CorruptionsFixed+res.LeaksFixed != 0 {
			t.Fatalf("check without repair fixed something: %+v", res)
		}
	})
}

// FuzzRepair: -r leaks and then -r all on a hostile image never panic,
// and when -r all reports a clean image, checking it afresh agrees.
func FuzzRepair(f *testing.F) {
	for _, b := range checkSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p := writeFuzzImage(t, b)
		var final *CheckResult
		for _, mode := range []RepairMode{RepairLeaks, RepairAll} {
			img, err := OpenForCheck(p, OpenOptions{NoLock: true, NoBacking: true})
			if err != nil {
				return
			}
			res, err := img.Check(mode)
			if cerr := img.Close(); err == nil {
				err = cerr
			}
			if res == nil {
				t.Fatalf("Check(%d) returned no result (err %v)", mode, err)
			}
			if err != nil {
				return
			}
			final = res
		}
		if final.ExitCode() != 0 {
			return
		}
		img, err := OpenForCheck(p, OpenOptions{ReadOnly: true, NoLock: true, NoBacking: true})
		if err != nil {
			t.Fatalf("repair reported a clean image that no longer opens: %v", err)
		}
		defer img.Close()
		again, err := img.Check(RepairNone)
		if err != nil || again.ExitCode() != 0 {
			t.Fatalf("repair reported a clean image; a fresh check says %v %+v\n%v", err, again, again.Messages)
		}
	})
}
