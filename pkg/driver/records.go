package driver

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// records is a directory of JSON records, one <name>.json file each: the
// volumes' metadata (the pool directory), the snapshots' records
// (.snapshots) and the staged volumes' (.staged). A record is committed by
// one atomic rename (writeFileAtomic) and removed durably. The file names
// and contents are those earlier releases wrote, so their records still
// read after an upgrade.
type records struct {
	dir string
	// kind and what name a record in errors: `volume "x": metadata PATH: ...`.
	kind, what string
	// lazy: the directory is made by the first put; until then it holds no
	// records. Otherwise it must exist (the pool directory).
	lazy bool
}

func (p *pool) volumes() records { return records{dir: p.dir, kind: "volume", what: "metadata"} }
func (p *pool) snapshots() records {
	return records{dir: filepath.Join(p.dir, snapshotsDir), kind: "snapshot", what: "record", lazy: true}
}
func (p *pool) stagedVolumes() records {
	return records{dir: filepath.Join(p.dir, stagedDir), kind: "staged volume", what: "record", lazy: true}
}

// path is the file of name's record.
func (r records) path(name string) string { return filepath.Join(r.dir, name+metaSuffix) }

// get decodes name's record into v. A missing record is ErrNotFound; one
// that does not decode is an error naming its file.
func (r records) get(name string, v any) error {
	path := r.path(name)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s %q: %w", r.kind, name, ErrNotFound)
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s %q: %s %s: %v", r.kind, name, r.what, path, err)
	}
	return nil
}

// put commits v as name's record atomically.
func (r records) put(name string, v any) error {
	if r.lazy {
		if err := os.MkdirAll(r.dir, 0o750); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(r.path(name), append(b, '\n'))
}

// remove deletes name's record durably; one already gone is fine.
func (r records) remove(name string) error { return removeDurably(r.path(name)) }

// names lists the names of the records, sorted: the regular <name>.json
// files, leaving out temporary ones (whose names start with a dot).
func (r records) names() ([]string, error) {
	ents, err := os.ReadDir(r.dir)
	if r.lazy && errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		n := e.Name()
		if !e.Type().IsRegular() || !strings.HasSuffix(n, metaSuffix) || strings.HasPrefix(n, ".") {
			continue
		}
		out = append(out, strings.TrimSuffix(n, metaSuffix))
	}
	sort.Strings(out)
	return out, nil
}

// removeTemps removes the temporary files of writes a crash interrupted.
// Only at start: a write in progress has one too.
func (r records) removeTemps() error {
	ents, err := os.ReadDir(r.dir)
	if r.lazy && errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range ents {
		if n := e.Name(); strings.HasPrefix(n, tmpPrefix) {
			if err := os.Remove(filepath.Join(r.dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}
