package driver

import (
	"context"
	"fmt"
)

// Encrypted volumes (StorageClass parameter encrypted: "true").
//
// The image is a qcow2 LUKS image (pkg/qcow2): data is encrypted before it
// reaches the pool file, and stays encrypted in snapshots, restores, clones
// and any copy of the file. The passphrase is the value of the key
// "passphrase" of a Kubernetes Secret that the external-provisioner
// (csi.storage.k8s.io/provisioner-secret-name/-namespace) hands to
// CreateVolume and the kubelet (csi.storage.k8s.io/node-stage-secret-name/
// -namespace) to NodeStageVolume.
//
// The passphrase is never written: not in the volume's record (which says
// only encrypted: true), not in logs (requests are logged through
// protosanitizer, which strips CSI secrets), not in events or metrics, not
// in any process's arguments (no tool is run with it). NodeStage hands it
// to the image library, which keeps only the derived master key, in
// memory, until the image closes (then zeroed; the AES key schedule inside
// crypto/aes cannot be cleared from Go). The copies made here are zeroed
// as soon as the image is open; the string in the gRPC request cannot be.
// The master key also goes to the kernel keyring until NodeUnstage, for a
// restarted plugin (encryption_keys.go).
//
// Restore and clone copy the image file, LUKS header included: the new
// volume has the same key slots, so its Secret must hold the same
// passphrase. Key rotation is done on the image with qcow2-csi img amend
// (docs/encryption.md); the driver opens whichever slot the Secret opens.

// secretPassphrase is the Secret key that holds the passphrase.
const secretPassphrase = "passphrase"

// passphraseFrom returns a copy of the passphrase in a request's secrets,
// or an ErrInvalid naming what is missing. The caller zeroes the copy.
func passphraseFrom(secrets map[string]string, volumeID, which string) ([]byte, error) {
	p, ok := secrets[secretPassphrase]
	if !ok || p == "" {
		return nil, fmt.Errorf("%w: volume %q is encrypted: the %s secret must have a non-empty key %q (StorageClass parameters csi.storage.k8s.io/%s-secret-name and -namespace)",
			ErrInvalid, volumeID, which, secretPassphrase, which)
	}
	return []byte(p), nil
}

// checkRestoredEncryption makes sure a restored or cloned image (at path)
// is what the StorageClass asks for: a restore keeps the source's
// encryption, so an encrypted source cannot land in a plain class (its
// NodeStage would get no key) nor a plain one in an encrypted class (its
// data would be in clear); and the provisioner secret must open it, so
// that a wrong Secret fails here rather than at the first NodeStage.
func (d *Driver) checkRestoredEncryption(ctx context.Context, path, volumeID string, encrypted bool, pass []byte) error {
	img, err := d.images.Open(ctx, path, ImageOpenOptions{ReadOnly: true, Passphrase: pass, MetadataOnly: !encrypted})
	if err != nil {
		return fmt.Errorf("volume %q: restored image: %w", volumeID, err)
	}
	enc := img.Encrypted()
	if err := img.Close(); err != nil {
		return fmt.Errorf("volume %q: restored image: %w", volumeID, err)
	}
	if enc != encrypted {
		return fmt.Errorf("volume %q: %w", volumeID, encryptionMismatch(enc, encrypted))
	}
	return nil
}

// encryptionMismatch is the refusal of a restore or clone whose source's
// encryption is not what the new volume's StorageClass says.
func encryptionMismatch(source, class bool) error {
	return fmt.Errorf("%w: a restore or clone keeps the source's encryption: the source is %s, the StorageClass says %s=%t",
		ErrInvalid, map[bool]string{true: "encrypted", false: "not encrypted"}[source], paramEncrypted, class)
}
