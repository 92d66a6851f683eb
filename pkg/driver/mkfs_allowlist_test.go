package driver

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// mkfsSamples use every option and sub-option of the allowlist at least
// once, in combinations the real tools accept.
var mkfsSamples = map[string][]string{
	"ext4": {
		"-L data -b 4096 -i 16384 -I 256 -m 1 -N 20000 -O ^metadata_csum -j -J size=4,location=0 " +
			"-E root_owner=1000:1000,lazy_itable_init=1,lazy_journal_init=1,nodiscard,stride=16,stripe_width=32 " +
			"-g 8192 -q",
		"-E resize=1000000,quotatype=usrquota,orphan_file_size=1048576,assume_storage_prezeroed=1",
		"-e remount-ro -G 16 -M /data -r 1 -T default -U random -O bigalloc,sparse_super2,fast_commit -C 65536 -J fast_commit_size=256 -v " +
			"-E num_backup_sb=1,packed_meta_blocks=1,encoding=utf8,encoding_flags=strict,discard,stripe-width=32",
	},
	"xfs": {
		"-L data -b size=4096 -m crc=1,finobt=1,rmapbt=0,reflink=1,inobtcount=1,bigtime=1 " +
			"-d agcount=4,su=64k,sw=2,extszinherit=0,cowextsize=0,daxinherit=0,projinherit=0 " +
			"-i size=512,maxpct=25,align=1,attr=2,projid32bit=1,sparse=1,nrext64=0 " +
			"-l size=64m,version=2,lazy-count=1,internal -n size=4096,version=2,ftype=1 -s size=4096 -K -q",
		"-m uuid=9f2b6a84-5ad3-4cb6-9d7b-2b1f8f7c1e11 -d agsize=160m,sunit=128,swidth=256 -i perblock=8 -l sunit=8 -q",
		"-d noalign -l su=4096 -q",
	},
}

// TestMkfsAllowlistRealTools: every allowed option is one the real mkfs
// knows (a typo in the allowlist would let nothing through, or the wrong
// thing), checked by formatting a file with the samples, which must cover
// the whole allowlist.
func TestMkfsAllowlistRealTools(t *testing.T) {
	for fs, flags := range mkfsFlags {
		t.Run(fs, func(t *testing.T) {
			mkfs := peer.Require(t, "mkfs."+fs)
			used := map[string]bool{}
			for _, s := range mkfsSamples[fs] {
				args, err := mkfsOptionsFor(fs, s)
				if err != nil {
					t.Fatalf("sample %q refused: %v", s, err)
				}
				for i, a := range args {
					if f, ok := flags[a]; ok && (i == 0 || !flags[args[i-1]].value) {
						used[a] = true
						if f.subs != nil {
							for _, sub := range strings.Split(args[i+1], ",") {
								name, _, _ := strings.Cut(sub, "=")
								used[a+" "+name] = true
							}
						}
					}
				}
				img := filepath.Join(t.TempDir(), "fs.img")
				if err := os.WriteFile(img, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Truncate(img, 320<<20); err != nil {
					t.Fatal(err)
				}
				// As k8s.io/mount-utils calls it: the options, then its own.
				force := []string{"-F", "-m0"}
				if fs == "xfs" {
					force = []string{"-f"}
				}
				if out, err := exec.Command(mkfs, append(append(args, force...), img)...).CombinedOutput(); err != nil {
					t.Errorf("%s %s: %v\n%s", mkfs, s, err, out)
				}
			}
			for n, f := range flags {
				if f.refused != "" {
					continue
				}
				if !used[n] {
					t.Errorf("allowed option %s is in no sample", n)
				}
				for sub := range f.subs {
					if !used[n+" "+sub] {
						t.Errorf("allowed sub-option %s %s is in no sample", n, sub)
					}
				}
			}
		})
	}
}
