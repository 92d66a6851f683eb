package driver

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestBelow(t *testing.T) {
	for _, tc := range []struct {
		dir, p string
		want   bool
	}{
		{"/var/lib/kubelet", "/var/lib/kubelet/pods/x", true},
		{"/var/lib/kubelet", "/var/lib/kubelet", false},
		{"/var/lib/kubelet", "/var/lib/kubelet2/pods", false},
		{"/var/lib/kubelet", "/var/lib", false},
		{"/", "/x", true},
		{"/", "/", false},
	} {
		if got := below(tc.dir, tc.p); got != tc.want {
			t.Errorf("below(%q, %q) = %v, want %v", tc.dir, tc.p, got, tc.want)
		}
	}
}

func TestCheckNodePath(t *testing.T) {
	dir := t.TempDir()
	kubelet := filepath.Join(dir, "kubelet")
	real := filepath.Join(dir, "disk", "kubelet")
	if err := os.MkdirAll(filepath.Join(real, "pods", "uid"), 0o750); err != nil {
		t.Fatal(err)
	}
	// The kubelet directory itself may be a link (to another disk): that is
	// the operator's doing and allowed, in both its forms.
	if err := os.Symlink(real, kubelet); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc", filepath.Join(real, "pods", "etc")); err != nil {
		t.Fatal(err)
	}
	d := &Driver{opts: Options{KubeletDir: kubelet}}
	for _, tc := range []struct {
		p    string
		want error
	}{
		{filepath.Join(kubelet, "pods", "uid", "volumes", "mount"), nil},
		{filepath.Join(real, "pods", "uid", "mount"), nil},
		{filepath.Join(kubelet, "pods", "etc", "mount"), ErrInvalid},
		{filepath.Join(real, "pods", "etc"), ErrInvalid},
		{kubelet, ErrInvalid},
		{filepath.Join(dir, "other"), ErrInvalid},
		{"/", ErrInvalid},
	} {
		if err := d.checkNodePath("target path", tc.p); !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
			t.Errorf("checkNodePath(%s) = %v, want %v", tc.p, err, tc.want)
		}
	}
	// A recorded path that now runs through a link is left alone.
	if err := d.checkRecordedPath("target path", filepath.Join(kubelet, "pods", "etc", "passwd")); !errors.Is(err, ErrPrecondition) {
		t.Errorf("recorded path through a link: %v, want ErrPrecondition", err)
	}
}

func TestUnescapeMountPath(t *testing.T) {
	for in, want := range map[string]string{
		`/a/b`:              "/a/b",
		`/a\040b`:           "/a b",
		`/tab\011x\134y`:    "/tab\tx\\y",
		`/trailing\04`:      `/trailing\04`,
		`/not\999octal\040`: `/not\999octal `,
	} {
		if got := unescapeMountPath(in); got != want {
			t.Errorf("unescapeMountPath(%q) = %q, want %q", in, got, want)
		}
	}
}

// BenchmarkTopMount: what one "what is mounted here" check costs (a read
// and parse of the mount table), paid by stage, publish, unpublish and
// stats; compare with the milliseconds of a mount.
func BenchmarkTopMount(b *testing.B) {
	n, err := os.ReadFile(mountInfoPath)
	if err != nil {
		b.Skip(err)
	}
	for b.Loop() {
		if _, err := topMount("/proc"); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(strings.Count(string(n), "\n")), "mounts")
}
