//go:build linux

package driver_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestKernelKeyring: a key put by one process is found, read and removed
// by a process of the same uid that does not possess it (a new session
// keyring, as runc gives every container: a restarted node plugin), with
// permissions for possessor and uid only; a second Put replaces the key;
// Remove of a missing key is not an error.
func TestKernelKeyring(t *testing.T) {
	peer.Root(t)
	if _, err := unix.KeyctlGetKeyringID(unix.KEY_SPEC_USER_KEYRING, true); err != nil {
		peer.Missing(t, "the kernel keyring", err.Error())
	}
	k := driver.KernelKeyring{Prefix: fmt.Sprintf("test-%d", os.Getpid())}
	const vol = "vol-keyring"
	t.Cleanup(func() { _ = k.Remove(vol) })
	if _, err := k.Get(vol); !errors.Is(err, driver.ErrKeyNotKept) {
		t.Fatalf("Get before Put = %v, want ErrKeyNotKept", err)
	}
	first := bytes.Repeat([]byte{0xa5}, 64)
	if err := k.Put(vol, first); err != nil {
		t.Fatal(err)
	}
	second := bytes.Repeat([]byte{0x5a}, 64)
	if err := k.Put(vol, second); err != nil {
		t.Fatal(err)
	}
	// As another process would: a thread on a fresh session keyring.
	type result struct {
		key  []byte
		desc string
		err  error
	}
	ch := make(chan result)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with its odd keyring
		if _, err := unix.KeyctlJoinSessionKeyring(fmt.Sprintf("_ses.qcow2-csi-test-%d", os.Getpid())); err != nil {
			ch <- result{err: fmt.Errorf("join a new session keyring: %w", err)}
			return
		}
		key, err := k.Get(vol)
		var desc string
		if err == nil {
			id, _ := unix.KeyctlSearch(unix.KEY_SPEC_USER_KEYRING, "user", "qcow2-csi:"+k.Prefix+":"+vol, 0)
			desc, err = unix.KeyctlString(unix.KEYCTL_DESCRIBE, id)
		}
		if err == nil {
			err = k.Remove(vol)
		}
		ch <- result{key, desc, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	if !bytes.Equal(r.key, second) {
		t.Fatalf("Get from a new session = %x, want the second key", r.key)
	}
	// type;uid;gid;perm;description: possessor and user all, group and other none.
	if want := "user;0;0;3f3f0000;qcow2-csi:" + k.Prefix + ":" + vol; r.desc != want {
		t.Fatalf("key described %q, want %q", r.desc, want)
	}
	if _, err := k.Get(vol); !errors.Is(err, driver.ErrKeyNotKept) {
		t.Fatalf("Get after Remove = %v, want ErrKeyNotKept", err)
	}
	if err := k.Remove(vol); err != nil {
		t.Fatalf("Remove of a missing key: %v", err)
	}
}
