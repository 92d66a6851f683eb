package main

import (
	"bufio"
	"context"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

func TestParseReserve(t *testing.T) {
	tests := []struct {
		in      string
		bytes   int64
		percent float64
		err     bool
	}{
		{"0", 0, 0, false},
		{"10Gi", 10 << 30, 0, false},
		{"1073741824", 1 << 30, 0, false},
		{"5%", 0, 5, false},
		{"100%", 0, 100, false},
		{"101%", 0, 0, true},
		{"-1", 0, 0, true},
		{"10GB", 0, 0, true},
		{"", 0, 0, true},
	}
	for _, tc := range tests {
		b, p, err := parseReserve(tc.in)
		if b != tc.bytes || p != tc.percent || (err != nil) != tc.err {
			t.Errorf("parseReserve(%q) = %d, %g, %v", tc.in, b, p, err)
		}
	}
}

// TestServeNoFlags: the README's run command. With no flags serve prints
// where it serves; the socket answers CSI, here the whole controller path of
// a qcow2 volume; health and metrics answer when asked for.
func TestServeNoFlags(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	r, w := io.Pipe()
	done := make(chan error, 1)
	f := serveFlags{mode: "all", driverName: "qcow2.csi.qcow2-csi.io", attachBackend: "auto", capacityReserve: "0",
		defaultSz: "1Gi", controllerExpand: true}
	go func() { done <- serve(ctx, f, w); w.Close() }()
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		cancel()
		t.Fatalf("serve printed %q: %v (exit %v)", line, err, <-done)
	}
	go io.Copy(io.Discard, r)
	m := regexp.MustCompile(`serving mode all on (unix://(/\S+)/csi\.sock) \(node \S+, pool (\S+)\)`).FindStringSubmatch(line)
	if m == nil {
		cancel()
		t.Fatalf("serve printed %q", line)
	}
	tmp := m[2]
	defer os.RemoveAll(tmp)
	if m[3] != filepath.Join(tmp, "pool") {
		t.Errorf("pool %s is not in the temporary directory %s", m[3], tmp)
	}
	conn, err := grpc.NewClient(m[1], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	defer ccancel()
	info, err := csi.NewIdentityClient(conn).GetPluginInfo(cctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.Name != "qcow2.csi.qcow2-csi.io" || info.VendorVersion != version {
		t.Fatalf("GetPluginInfo = %v, %v", info, err)
	}
	cc := csi.NewControllerClient(conn)
	v, err := cc.CreateVolume(cctx, &csi.CreateVolumeRequest{Name: "pvc-1", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 40},
		VolumeCapabilities: []*csi.VolumeCapability{{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}}})
	if err != nil || v.Volume.CapacityBytes != 1<<40 {
		t.Fatalf("CreateVolume = %v, %v", v, err)
	}
	hdr := make([]byte, 4)
	// The pool names the image by the ID's local part, before @node/#hash.
	local, _, _ := strings.Cut(strings.Replace(v.Volume.VolumeId, "#", "@", 1), "@")
	fh, err := os.Open(filepath.Join(m[3], local+".qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	fh.Read(hdr)
	fh.Close()
	if string(hdr) != "QFI\xfb" {
		t.Fatalf("image starts %q, not the qcow2 magic", hdr)
	}
	// The ad hoc run confines node paths to the temporary directory.
	_, err = csi.NewNodeClient(conn).NodeStageVolume(cctx, &csi.NodeStageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: "/etc/qcow2-csi-staging",
		VolumeCapability: &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}})
	if want := "is not below the kubelet directory " + os.TempDir(); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), want) {
		t.Errorf("NodeStageVolume at /etc: %v, want InvalidArgument saying %q", err, want)
	}
	if _, err := cc.DeleteVolume(cctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
}
