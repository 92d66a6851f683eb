package main

import (
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseArgs(t *testing.T) {
	spec := argSpec{short: "f:o:qU", long: map[string]bool{"output": true, "shrink": false}, negativeLast: true}
	cases := []struct {
		args    []string
		opts    []optVal
		pos     []string
		wantErr bool
	}{
		{[]string{"-f", "qcow2", "a"}, []optVal{{"f", "qcow2"}}, []string{"a"}, false},
		{[]string{"-fqcow2", "a", "-q"}, []optVal{{"f", "qcow2"}, {"q", ""}}, []string{"a"}, false},
		{[]string{"-qU", "a"}, []optVal{{"q", ""}, {"U", ""}}, []string{"a"}, false},
		{[]string{"--output=json", "a"}, []optVal{{"output", "json"}}, []string{"a"}, false},
		{[]string{"--output", "json", "a"}, []optVal{{"output", "json"}}, []string{"a"}, false},
		{[]string{"--shrink", "f", "-1G"}, []optVal{{"shrink", ""}}, []string{"f", "-1G"}, false},
		{[]string{"-o", "a=1", "-o", "b=2", "--", "-x"}, []optVal{{"o", "a=1"}, {"o", "b=2"}}, []string{"-x"}, false},
		{[]string{"-z"}, nil, nil, true},
		{[]string{"--nope"}, nil, nil, true},
		{[]string{"-f"}, nil, nil, true},
		{[]string{"--shrink=1"}, nil, nil, true},
	}
	for _, c := range cases {
		p, err := parseArgs(c.args, spec)
		if (err != nil) != c.wantErr {
			t.Errorf("%v: err %v", c.args, err)
			continue
		}
		if err != nil {
			continue
		}
		if !reflect.DeepEqual(p.opts, c.opts) || !reflect.DeepEqual(p.pos, c.pos) {
			t.Errorf("%v: got %v %v, want %v %v", c.args, p.opts, p.pos, c.opts, c.pos)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "512": 512, "1k": 1024, "64K": 65536, "1M": 1 << 20, "2G": 2 << 30, "1.5G": 3 << 29, "1T": 1 << 40, "100b": 100} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "x", "-1", "1Q", "99999999E"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) succeeded", bad)
		}
	}
}

func TestParseOptionList(t *testing.T) {
	got, err := parseOptionList("cluster_size=4k,backing_file=a,,b,help")
	want := optionList{{"cluster_size", "4k"}, {"backing_file", "a,b"}, {"help", ""}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v %v, want %v", got, err, want)
	}
	if _, err := parseOptionList("novalue"); err == nil {
		t.Fatal("option without value accepted")
	}
}

func TestSizeToStr(t *testing.T) {
	for v, want := range map[int64]string{0: "0 B", 512: "512 B", 1 << 20: "1 MiB", 69632: "68 KiB", 335872: "328 KiB", 1000 * 1024: "0.977 MiB", 3 << 29: "1.5 GiB"} {
		if got := sizeToStr(v); got != want {
			t.Errorf("sizeToStr(%d) = %q, want %q", v, got, want)
		}
	}
}

// Every img sub-command parses its arguments with parseArgs: a long option
// that merely starts with a known one (--formatx) is refused by name, never
// taken for it.
func TestImgCommandsRefuseUnknownLongOption(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.qcow2")
	if code, _, stderr := capture(t, "create", "-q", "-f", "qcow2", p, "1M"); code != 0 {
		t.Fatalf("create: %d %s", code, stderr)
	}
	for name := range imgCommands {
		want := 1
		if name == "compare" {
			want = 2 // qemu-img compare's exit status for an error
		}
		for _, opt := range [][]string{{"--formatx=qcow2"}, {"--formatx", "qcow2"}} {
			args := append(append([]string{name}, opt...), p, "1M")
			code, _, stderr := capture(t, args...)
			if code != want || !strings.Contains(stderr, "unrecognized option '--formatx") {
				t.Errorf("%v: exit %d, stderr %q; want %d and the option named", args, code, stderr, want)
			}
		}
	}
	// What getopt_long accepts still works: an unambiguous prefix.
	if code, out, stderr := capture(t, "check", "--out=json", p); code != 0 || !strings.Contains(out, `"check-errors": 0`) {
		t.Errorf("check --out=json: exit %d\n%s%s", code, out, stderr)
	}
	if code, _, stderr := capture(t, "bitmap", "--ad", "--gran", "64k", p, "b"); code != 0 {
		t.Errorf("bitmap --ad --gran 64k: exit %d %s", code, stderr)
	}
}
