package main

import (
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

func TestParseAttachFlags(t *testing.T) {
	for _, c := range []struct {
		args    []string
		want    attachOptions
		wantErr string
	}{
		{args: []string{"img.raw"}, want: attachOptions{backend: "fuse", fuseDir: "/run/qcow2-csi/fuse", format: "raw", cache: fuse.DefaultCacheMode, file: "img.raw"}},
		{args: []string{"--fuse-cache=writeback", "a"}, want: attachOptions{backend: "fuse", fuseDir: "/run/qcow2-csi/fuse", format: "raw", cache: fuse.CacheWriteback, file: "a"}},
		{args: []string{"--fuse-cache=none", "a"}, want: attachOptions{backend: "fuse", fuseDir: "/run/qcow2-csi/fuse", format: "raw", cache: fuse.CacheNone, file: "a"}},
		{args: []string{"--fuse-cache=always", "a"}, wantErr: `--fuse-cache: nbdattach: fuse: cache mode "always": must be none, writethrough or writeback`},
		{args: []string{"-r", "-f", "raw", "--block-size=4096", "--fuse-dir=/x", "--clean-stale", "a"}, want: attachOptions{backend: "fuse", fuseDir: "/x", format: "raw", blockSize: 4096, readOnly: true, cleanStale: true, cache: fuse.DefaultCacheMode, file: "a"}},
		{args: []string{}, wantErr: "exactly one FILE"},
		{args: []string{"a", "b"}, wantErr: "exactly one FILE"},
		{args: []string{"--block-size=1000", "a"}, wantErr: "--block-size=1000"},
		{args: []string{"--nope", "a"}, wantErr: "not defined"},
		{args: []string{"--limits=writeIOPS=200,writeIOPSBurst=400,readBytesPerSecond=10M", "a"}, want: attachOptions{backend: "fuse", fuseDir: "/run/qcow2-csi/fuse", format: "raw", cache: fuse.DefaultCacheMode, file: "a",
			limits: throttle.Limits{WriteIOPS: throttle.Rate{Avg: 200, Burst: 400}, ReadBytes: throttle.Rate{Avg: 10 << 20}}}},
		{args: []string{"--limits=writeIOPS", "a"}, wantErr: `--limits: invalid throttle limit: "writeIOPS" is not KEY=VALUE`},
		{args: []string{"--limits=writeIOPS=1,iops=2", "a"}, wantErr: `--limits: invalid throttle limit: unknown parameter "iops"`},
		{args: []string{"--limits=writeIOPS=1,writeIOPS=2", "a"}, wantErr: `--limits: invalid throttle limit: writeIOPS given twice`},
		{args: []string{"--limits=writeIOPSBurst=2", "a"}, wantErr: "writeIOPSBurst=2 needs writeIOPS"},
		{args: []string{"--limits=writeIOPS=200", "--fuse-cache=writeback", "a"}, wantErr: "--limits cannot be enforced with --fuse-cache=writeback"},
		{args: []string{"--fuse-uring", "--limits=writeIOPS=200", "a"}, want: attachOptions{backend: "fuse", fuseDir: "/run/qcow2-csi/fuse", format: "raw", cache: fuse.DefaultCacheMode, file: "a", uring: true,
			limits: throttle.Limits{WriteIOPS: throttle.Rate{Avg: 200}}}},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			o, err := parseAttachFlags(c.args)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err %v, want %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if *o != c.want {
				t.Fatalf("got %+v, want %+v", *o, c.want)
			}
		})
	}
}

func TestAttachID(t *testing.T) {
	for in, prefix := range map[string]string{
		"/var/pool/vol-1.qcow2": "vol-1.qcow2-",
		"a b/c:d":               "c_d-",
		"..":                    "..-",
	} {
		if got := attachID(in); !strings.HasPrefix(got, prefix) {
			t.Errorf("attachID(%q) = %q, want prefix %q", in, got, prefix)
		}
	}
}
