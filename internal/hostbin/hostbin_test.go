package hostbin

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseLdd(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []string
		wantErr string
	}{
		{
			name: "dynamic",
			in: "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibblkid.so.1 => /lib/x86_64-linux-gnu/libblkid.so.1 (0x00007f)\n" +
				"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n",
			want: []string{"/lib/x86_64-linux-gnu/libblkid.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"},
		},
		{name: "static", in: "\tstatically linked\n", want: nil},
		{name: "missing library", in: "\tlibfoo.so.1 => not found\n", wantErr: "missing library: libfoo.so.1 => not found"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseLdd([]byte(tc.in))
			if tc.wantErr != "" {
				if err == nil || err.Error() != tc.wantErr {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// CopyProgram hands over a real dynamic program under the mapped path and
// its libraries, the ELF interpreter among them, under their host paths;
// a program the host lacks is ErrNotFound.
// A script has no libraries of its own (its interpreter is the caller's):
// xfs_info and fsck.xfs, which the VM tests copy, are scripts.
func TestLibrariesScript(t *testing.T) {
	p := filepath.Join(t.TempDir(), "script")
	if err := os.WriteFile(p, []byte("#!/bin/sh\necho hi\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	libs, err := Libraries(p)
	if err != nil || libs != nil {
		t.Fatalf("Libraries of a script: %v, %v; want none and no error", libs, err)
	}
}

func TestCopyProgram(t *testing.T) {
	src, err := LookPath("ls")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	add := func(dst, src string) error { got[dst] = src; return nil }
	if err := CopyProgram("ls", add, Options{ProgramPath: func(h string) string { return "/x" + h }}); err != nil {
		t.Fatal(err)
	}
	if got["/x"+src] != src {
		t.Fatalf("program not handed over as /x%s: %v", src, got)
	}
	interp := false
	for dst, s := range got {
		if dst != "/x"+src && dst != s {
			t.Errorf("library %s handed over as %s", s, dst)
		}
		interp = interp || strings.Contains(dst, "ld-linux")
	}
	if len(got) < 3 || !interp {
		t.Fatalf("want the program, libc and the ELF interpreter, got %v", got)
	}
	if err := CopyProgram("no-such-program-qcow2-csi", add, Options{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing program: %v, want ErrNotFound", err)
	}
}
