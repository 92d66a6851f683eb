package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"
)

func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: d.opts.DriverName, VendorVersion: d.opts.Version}, nil
}

func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	svc := func(t csi.PluginCapability_Service_Type) *csi.PluginCapability {
		return &csi.PluginCapability{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: t}}}
	}
	exp := func(t csi.PluginCapability_VolumeExpansion_Type) *csi.PluginCapability {
		return &csi.PluginCapability{Type: &csi.PluginCapability_VolumeExpansion_{VolumeExpansion: &csi.PluginCapability_VolumeExpansion{Type: t}}}
	}
	caps := []*csi.PluginCapability{svc(csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS)}
	if d.canGrow() {
		// Online: a staged, mounted volume grows through its open image.
		// Offline (closed image) growth is ControllerExpandVolume's; both
		// are supported, ONLINE is the stronger promise.
		caps = append(caps, exp(csi.PluginCapability_VolumeExpansion_ONLINE))
	}
	if d.opts.Mode.controller() {
		caps = append(caps, svc(csi.PluginCapability_Service_CONTROLLER_SERVICE))
		if d.snapshotMetadata() {
			caps = append(caps, svc(csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE),
				svc(csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE))
		}
	}
	return &csi.GetPluginCapabilitiesResponse{Capabilities: caps}, nil
}

// Probe answers ready only when every RPC of the driver's mode can succeed:
// start-up re-attach done, pool writable and, on a node, an attach backend
// available. Not ready is an answer, not an error, so that the CO waits.
func (d *Driver) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	err := d.readiness()
	if err != nil {
		klog.FromContext(ctx).V(2).Info("Not ready", "reason", err.Error())
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(err == nil)}, nil
}
