package qcow2

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The crash test runs a writer in a child process (this test binary,
// TestCrashHelper), kills it with SIGKILL at a random moment, and checks
// that the image opens, qemu-img check finds no corruption, and every
// write completed before the last completed Flush reads back.

const (
	crashSlots    = 48
	crashSlotSize = 40*1024 + 512 // not cluster aligned: partial-cluster COW
)

type crashOp struct {
	slot int
	zero bool
}

func crashOpFor(seed uint64, i int) crashOp {
	r := rand.New(rand.NewPCG(seed, uint64(i)))
	return crashOp{slot: r.IntN(crashSlots), zero: r.IntN(6) == 0}
}

// crashPattern is what op i writes: each sector starts with i and the slot.
func crashPattern(i int, op crashOp) []byte {
	b := make([]byte, crashSlotSize)
	if op.zero {
		return b
	}
	for s := 0; s < len(b); s += 512 {
		binary.LittleEndian.PutUint64(b[s:], uint64(i)+1)
		binary.LittleEndian.PutUint64(b[s+8:], uint64(op.slot))
		for j := s + 16; j < s+512; j++ {
			b[j] = byte(i + j)
		}
	}
	return b
}

// TestCrashHelper is the child writer; it does nothing in a normal run.
func TestCrashHelper(t *testing.T) {
	path := os.Getenv("QCOW2_CRASH_IMAGE")
	if path == "" {
		t.Skip("helper for TestCrashSIGKILL")
	}
	seed, _ := strconv.ParseUint(os.Getenv("QCOW2_CRASH_SEED"), 10, 64)
	start, _ := strconv.Atoi(os.Getenv("QCOW2_CRASH_START"))
	img, err := Open(path, OpenOptions{})
	if err != nil {
		fmt.Printf("E %v\n", err)
		os.Exit(3)
	}
	w := bufio.NewWriter(os.Stdout)
	for i := start; ; i++ {
		op := crashOpFor(seed, i)
		fmt.Fprintf(w, "S %d\n", i)
		w.Flush()
		off := int64(op.slot) * crashSlotSize
		if op.zero {
			err = img.WriteZeroes(off, crashSlotSize, ZeroMayUnmap)
		} else {
			_, err = img.WriteAt(crashPattern(i, op), off)
		}
		if err == nil && i%5 == 4 {
			if err = img.Flush(); err == nil {
				fmt.Fprintf(w, "F %d\n", i)
				w.Flush()
			}
		}
		if err != nil {
			fmt.Fprintf(w, "E %v\n", err)
			w.Flush()
			os.Exit(3)
		}
	}
}

func TestCrashSIGKILL(t *testing.T) {
	if os.Getenv("QCOW2_CRASH_IMAGE") != "" {
		t.Skip("inside the helper")
	}
	for ci, c := range []struct {
		name string
		opts CreateOptions
	}{
		{"default", CreateOptions{ClusterSize: 65536}},
		{"lazy_refcounts", CreateOptions{LazyRefcounts: true, ClusterSize: 16384}},
		{"extended_l2_4k_refcount1", CreateOptions{ExtendedL2: true, ClusterSize: 32768, RefcountBits: 1}},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "crash.qcow2")
			o := c.opts
			o.Size = crashSlots * crashSlotSize
			img, err := Create(p, o)
			if err != nil {
				t.Fatal(err)
			}
			img.Close()
			state := make([]byte, o.Size) // what the image holds for sure
			seed := uint64(ci + 7)
			next := 0
			r := rand.New(rand.NewPCG(seed, 99))
			for round := 0; round < 12; round++ {
				started, flushed := runCrashChild(t, p, seed, next, time.Duration(20+r.IntN(150))*time.Millisecond)
				// Apply the ops known durable; collect the maybe-applied ones.
				maybe := map[int][][]byte{}
				for i := next; i <= started; i++ {
					op := crashOpFor(seed, i)
					pat := crashPattern(i, op)
					if i <= flushed {
						copy(state[int64(op.slot)*crashSlotSize:], pat)
						delete(maybe, op.slot)
					} else {
						maybe[op.slot] = append(maybe[op.slot], pat)
					}
				}
				// Open read-write (repairs lazy refcounts), then check.
				im, err := Open(p, OpenOptions{})
				if err != nil {
					t.Fatalf("round %d: open after crash: %v", round, err)
				}
				got := make([]byte, o.Size)
				if _, err := im.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
				res, out := qemuCheck(t, p)
				if res.Corruptions != 0 || res.CheckErrors != 0 {
					t.Fatalf("round %d: qemu-img check: %s", round, out)
				}
				if c.opts.LazyRefcounts && res.Leaks != 0 {
					t.Fatalf("round %d: leaks after our open-time repair: %s", round, out)
				}
				for s := 0; s < crashSlots; s++ {
					base := s * crashSlotSize
					for sec := 0; sec < crashSlotSize; sec += 512 {
						a := got[base+sec : base+sec+512]
						if bytes.Equal(a, state[base+sec:base+sec+512]) {
							continue
						}
						ok := false
						for _, pat := range maybe[s] {
							if bytes.Equal(a, pat[sec:sec+512]) {
								ok = true
								break
							}
						}
						if !ok {
							t.Fatalf("round %d: slot %d sector %d holds data that was neither flushed nor written after the flush (flushed=%d started=%d)", round, s, sec/512, flushed, started)
						}
					}
				}
				copy(state, got) // what it holds now is the new baseline
				if res.Leaks != 0 {
					// Leaks are allowed after a crash without lazy
					// refcounts; repair them so later rounds count anew.
					qemu(t, "qemu-img", "check", "-q", "-r", "leaks", p)
				}
				t.Logf("round %d: ops %d..%d, flushed through %d", round, next, started, flushed)
				next = started + 1
			}
		})
	}
}

// runCrashChild runs the writer for about d, kills it, and returns the last
// op it started and the last op covered by a completed flush (-1: none).
func runCrashChild(t *testing.T, p string, seed uint64, start int, d time.Duration) (started, flushed int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), "QCOW2_CRASH_IMAGE="+p, fmt.Sprint("QCOW2_CRASH_SEED=", seed), fmt.Sprint("QCOW2_CRASH_START=", start))
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1<<16)
	go func() {
		sc := bufio.NewScanner(pipe)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var all []string
	// Kill at a random moment after the writer got going (process start-up
	// time varies a lot, under -race especially).
	select {
	case l, ok := <-lines:
		if ok {
			all = append(all, l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("writer did not start")
	}
	time.Sleep(d)
	_ = cmd.Process.Signal(syscall.SIGKILL)
	for l := range lines {
		all = append(all, l)
	}
	_ = cmd.Wait()
	out := strings.Join(all, "\n")
	started, flushed = start-1, start-1
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "S":
			started, _ = strconv.Atoi(f[1])
		case "F":
			flushed, _ = strconv.Atoi(f[1])
		case "E":
			t.Fatalf("writer failed: %s", l)
		}
	}
	return started, flushed
}
