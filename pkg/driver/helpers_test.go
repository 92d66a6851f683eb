package driver_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// clients talk to a driver over its real gRPC socket, interceptor included.
type clients struct {
	csi.IdentityClient
	csi.ControllerClient
	csi.NodeClient
}

func dial(t testing.TB, srv *drivertest.Server) clients {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+srv.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return clients{csi.NewIdentityClient(conn), csi.NewControllerClient(conn), csi.NewNodeClient(conn)}
}

// startRaw starts a driver on raw images; attachers may be empty.
func startRaw(t testing.TB, opts driver.Options, attachers ...nbdattach.Attacher) (*drivertest.Server, clients) {
	t.Helper()
	opts.ControllerExpand = true
	srv := drivertest.Start(t, opts, driver.Seams{Images: drivertest.RawImages{}, Attachers: attachers})
	return srv, dial(t, srv)
}

func capMount(mode csi.VolumeCapability_AccessMode_Mode, fs string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
	}
}

func capBlock(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	}
}

const rw = csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER

// wantCode fails unless err has exactly code and its message contains msg.
func wantCode(t testing.TB, err error, code codes.Code, msg string) {
	t.Helper()
	s := status.Convert(err)
	if s.Code() != code || !strings.Contains(s.Message(), msg) {
		t.Fatalf("got %v %q, want %v containing %q", s.Code(), s.Message(), code, msg)
	}
}

// imageFile is where the pool keeps volume id's image: under the ID's
// local part, without the owner suffix (ids.go).
func imageFile(pool, id string) string { return filepath.Join(pool, localID(id)+".qcow2") }

// localID is a volume ID without its owner suffix: the pool's file name
// stem and the ID attach backends see.
func localID(id string) string {
	local, _, _ := strings.Cut(id, "@")
	local, _, _ = strings.Cut(local, "#")
	return local
}
