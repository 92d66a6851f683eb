package interop

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// ourBin builds cmd/qcow2-csi once per test run.
func ourBin(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "qcow2-csi-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "qcow2-csi")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/qcow2-csi/qcow2-csi/cmd/qcow2-csi").CombinedOutput()
		if err != nil {
			buildErr = errors.New(string(out))
		}
	})
	if buildErr != nil {
		t.Fatalf("build: %v", buildErr)
	}
	return binPath
}

// run returns stdout, stderr and the exit code.
func run(t *testing.T, dir, prog string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(prog, args...)
	cmd.Dir = dir
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", prog, err)
	}
	return o.String(), e.String(), code
}

func mustRun(t *testing.T, dir, prog string, args ...string) string {
	t.Helper()
	o, e, code := run(t, dir, prog, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit %d\n%s%s", filepath.Base(prog), strings.Join(args, " "), code, o, e)
	}
	return o
}

func jsonEqual(t *testing.T, what, a, b string) {
	t.Helper()
	var x, y any
	if err := json.Unmarshal([]byte(a), &x); err != nil {
		t.Fatalf("%s: qemu output: %v\n%s", what, err, a)
	}
	if err := json.Unmarshal([]byte(b), &y); err != nil {
		t.Fatalf("%s: our output: %v\n%s", what, err, b)
	}
	if !reflect.DeepEqual(x, y) {
		t.Fatalf("%s differs\nqemu-img: %s\nours:     %s", what, a, b)
	}
}

// setup makes a small zoo of images with qemu-img and qemu-io.
func setup(t *testing.T) string {
	q := peer.Require(t, "qemu-img")
	qio := peer.Require(t, "qemu-io")
	d := t.TempDir()
	mustRun(t, d, q, "create", "-q", "-f", "raw", "base.raw", "4M")
	mustRun(t, d, qio, "-f", "raw", "-c", "write -P 0x11 0 1M", "base.raw")
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2", "8M")
	mustRun(t, d, qio, "-c", "write -P 0x22 64k 64k", "-c", "write -z 256k 128k", "-c", "write -c -P 0x33 1M 64k", "ov.qcow2")
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,compat=0.10", "v2.qcow2", "3M")
	mustRun(t, d, qio, "-c", "write -P 1 0 100k", "v2.qcow2")
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd,refcount_bits=8,lazy_refcounts=on", "x.qcow2", "5M")
	mustRun(t, d, qio, "-c", "write -P 3 7000 9000", "-c", "write -z 2M 8k", "x.qcow2")
	mustRun(t, d, q, "snapshot", "-c", "snap1", "x.qcow2")
	mustRun(t, d, q, "bitmap", "--add", "x.qcow2", "bm0")
	return d
}

func TestImgInfoAndMapMatchQemu(t *testing.T) {
	d := setup(t)
	q, us := peer.Require(t, "qemu-img"), ourBin(t)
	for _, img := range []string{"ov.qcow2", "v2.qcow2", "x.qcow2", "base.raw"} {
		t.Run(img, func(t *testing.T) {
			jsonEqual(t, "info --output=json", mustRun(t, d, q, "info", "--output=json", img), mustRun(t, d, us, "img", "info", "--output=json", img))
			if a, b := mustRun(t, d, q, "info", img), mustRun(t, d, us, "img", "info", img); a != b {
				t.Fatalf("human info differs\nqemu-img:\n%s\nours:\n%s", a, b)
			}
			jsonEqual(t, "map --output=json", mustRun(t, d, q, "map", "--output=json", img), mustRun(t, d, us, "img", "map", "--output=json", img))
			a, _, ac := run(t, d, q, "map", img)
			b, _, bc := run(t, d, us, "img", "map", img)
			if a != b || ac != bc {
				t.Fatalf("human map differs\nqemu-img (exit %d):\n%s\nours (exit %d):\n%s", ac, a, bc, b)
			}
		})
	}
	// A backing chain, whole.
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "-b", "ov.qcow2", "-F", "qcow2", "top.qcow2")
	jsonEqual(t, "info --backing-chain", mustRun(t, d, q, "info", "--output=json", "--backing-chain", "top.qcow2"),
		mustRun(t, d, us, "img", "info", "--output=json", "--backing-chain", "top.qcow2"))
	jsonEqual(t, "map of a chain", mustRun(t, d, q, "map", "--output=json", "top.qcow2"), mustRun(t, d, us, "img", "map", "--output=json", "top.qcow2"))
	// --start-offset / --max-length
	jsonEqual(t, "map range", mustRun(t, d, q, "map", "--output=json", "--start-offset=100k", "--max-length", "1M", "ov.qcow2"),
		mustRun(t, d, us, "img", "map", "--output=json", "--start-offset=100k", "--max-length", "1M", "ov.qcow2"))
}

func TestImgCreateMatchesQemu(t *testing.T) {
	q, us := peer.Require(t, "qemu-img"), ourBin(t)
	d := t.TempDir()
	cases := [][]string{
		{"-f", "qcow2", "IMG", "1G"},
		{"-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on,refcount_bits=64", "IMG", "100M"},
		{"-f", "qcow2", "-o", "compat=0.10", "IMG", "5M"},
		{"-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd,preallocation=metadata", "IMG", "3M"},
		{"-f", "qcow2", "-o", "preallocation=falloc,cluster_size=2M", "IMG", "5M"},
		{"-f", "qcow2", "-o", "preallocation=full", "IMG", "1M"},
		{"-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "IMG"},
		{"-f", "raw", "IMG", "1M"},
	}
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "base.qcow2", "7M")
	for i, c := range cases {
		t.Run(strings.Join(c, "_"), func(t *testing.T) {
			qa := replace(c, "IMG", "q"+string(rune('a'+i)))
			ua := replace(c, "IMG", "u"+string(rune('a'+i)))
			qo := mustRun(t, d, q, append([]string{"create"}, qa...)...)
			uo := mustRun(t, d, us, append([]string{"img", "create"}, ua...)...)
			if strings.Replace(qo, "'q", "'u", 1) != uo {
				t.Fatalf("Formatting line differs\nqemu-img: %sours:     %s", qo, uo)
			}
			qi := mustRun(t, d, q, "info", "--output=json", qa[len(qa)-2+boolInt(qa[len(qa)-1] == qa[len(qa)-1] && !isSize(qa[len(qa)-1]))])
			ui := mustRun(t, d, q, "info", "--output=json", ua[len(ua)-2+boolInt(!isSize(ua[len(ua)-1]))])
			var x, y map[string]any
			_ = json.Unmarshal([]byte(qi), &x)
			_ = json.Unmarshal([]byte(ui), &y)
			for _, m := range []map[string]any{x, y} {
				delete(m, "filename")
				delete(m, "actual-size")
			}
			if !reflect.DeepEqual(x, y) {
				t.Fatalf("qemu-img info of the images differs\nqemu-img made: %s\nwe made:       %s", qi, ui)
			}
			if r, _, code := run(t, d, q, "check", ua[len(ua)-2+boolInt(!isSize(ua[len(ua)-1]))]); code != 0 && c[1] != "raw" {
				t.Fatalf("qemu-img check of our image: exit %d: %s", code, r)
			}
		})
	}
	// Errors: exit 1 and a message.
	for _, bad := range [][]string{
		{"-f", "qcow2", "-o", "cluster_size=3k", "bad.qcow2", "1M"},
		{"-f", "qcow2", "-b", "base.qcow2", "bad2.qcow2", "1M"},
		{"-f", "qcow2", "-o", "nosuch=1", "bad3.qcow2", "1M"},
		{"-f", "qcow2", "bad4.qcow2"},
	} {
		_, qe, qc := run(t, d, q, append([]string{"create"}, bad...)...)
		_, ue, uc := run(t, d, us, append([]string{"img", "create"}, bad...)...)
		if qc != uc || ue == "" {
			t.Errorf("create %v: qemu-img exit %d (%s), ours %d (%s)", bad, qc, qe, uc, ue)
		}
	}
}

func isSize(s string) bool { return s != "" && s[0] >= '0' && s[0] <= '9' }

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func replace(a []string, from, to string) []string {
	out := append([]string(nil), a...)
	for i := range out {
		if out[i] == from {
			out[i] = to
		}
	}
	return out
}

func TestImgCompareExitCodes(t *testing.T) {
	d := setup(t)
	q, us := peer.Require(t, "qemu-img"), ourBin(t)
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "-b", "ov.qcow2", "-F", "qcow2", "same.qcow2")
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "-b", "ov.qcow2", "-F", "qcow2", "diff.qcow2")
	mustRun(t, d, peer.Require(t, "qemu-io"), "-c", "write -P 9 1000 1", "diff.qcow2")
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "small.qcow2", "4M")
	mustRun(t, d, q, "convert", "-O", "raw", "ov.qcow2", "ov.raw")
	mustRun(t, d, q, "create", "-q", "-f", "raw", "big.raw", "9M")
	mustRun(t, d, q, "convert", "-O", "raw", "-n", "ov.qcow2", "big.raw")
	for _, c := range [][]string{
		{"ov.qcow2", "same.qcow2"},
		{"ov.qcow2", "diff.qcow2"},
		{"ov.qcow2", "small.qcow2"},
		{"ov.qcow2", "ov.raw"},
		{"ov.qcow2", "big.raw"},
		{"-s", "ov.qcow2", "big.raw"},
		{"ov.qcow2", "missing.qcow2"},
		{"-q", "ov.qcow2", "diff.qcow2"},
	} {
		qo, _, qc := run(t, d, q, append([]string{"compare"}, c...)...)
		uo, _, uc := run(t, d, us, append([]string{"img", "compare"}, c...)...)
		if qc != uc || qo != uo {
			t.Errorf("compare %v: qemu-img exit %d %q, ours exit %d %q", c, qc, qo, uc, uo)
		}
	}
}

func TestImgConvertInterop(t *testing.T) {
	d := setup(t)
	q, us := peer.Require(t, "qemu-img"), ourBin(t)
	for _, c := range [][]string{
		{"-O", "raw", "ov.qcow2", "o1.raw"},
		{"-O", "qcow2", "ov.qcow2", "o2.qcow2"},
		{"-c", "-O", "qcow2", "ov.qcow2", "o3.qcow2"},
		{"-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4k", "x.qcow2", "o4.qcow2"},
		{"-O", "qcow2", "-o", "extended_l2=on", "x.qcow2", "o5.qcow2"},
		{"-O", "qcow2", "-o", "compat=0.10,cluster_size=512", "base.raw", "o6.qcow2"},
		{"-S", "0", "-O", "raw", "v2.qcow2", "o7.raw"},
	} {
		t.Run(strings.Join(c, "_"), func(t *testing.T) {
			mustRun(t, d, us, append([]string{"img", "convert"}, c...)...)
			src, dst := c[len(c)-2], c[len(c)-1]
			mustRun(t, d, q, "compare", src, dst)
			if strings.HasSuffix(dst, ".qcow2") {
				mustRun(t, d, q, "check", dst)
			}
		})
	}
	// -n into an existing image with old data: zeroes must be written.
	mustRun(t, d, q, "create", "-q", "-f", "qcow2", "old.qcow2", "8M")
	mustRun(t, d, peer.Require(t, "qemu-io"), "-c", "write -P 0xee 0 8M", "old.qcow2")
	mustRun(t, d, us, "img", "convert", "-n", "-O", "qcow2", "ov.qcow2", "old.qcow2")
	mustRun(t, d, q, "compare", "ov.qcow2", "old.qcow2")
	mustRun(t, d, q, "check", "old.qcow2")
}
