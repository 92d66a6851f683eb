package driver

import (
	"errors"
	"testing"
)

// TestConflictsSymmetric: the table states each conflict once per side; a
// one-sided entry would let two operations run together depending on which
// came first.
func TestConflictsSymmetric(t *testing.T) {
	for a, bs := range conflicts {
		for _, b := range bs {
			if !conflict(b, a) {
				t.Errorf("%s conflicts with %s but not the reverse", a, b)
			}
		}
	}
}

func TestOpLocks(t *testing.T) {
	tests := []struct {
		held, want op
		busy       bool
	}{
		{opStage, opUnstage, true},
		{opStage, opStage, true},
		{opDelete, opRead, true},
		{opExpand, opPublish, true},
		{opRead, opRead, false},
		{opRead, opExpand, false},
		{opExpand, opRead, false},
		{opPublish, opRead, false},
		{opStage, opRead, true},
	}
	for _, tc := range tests {
		t.Run(string(tc.held)+"/"+string(tc.want), func(t *testing.T) {
			l := newOpLocks()
			rel, err := l.acquire("v", tc.held)
			if err != nil {
				t.Fatal(err)
			}
			// Another volume is never affected.
			rel2, err := l.acquire("w", tc.want)
			if err != nil {
				t.Fatalf("other volume: %v", err)
			}
			rel2()
			rel3, err := l.acquire("v", tc.want)
			if got := errors.Is(err, ErrBusy); got != tc.busy {
				t.Fatalf("busy = %v (%v), want %v", got, err, tc.busy)
			}
			if err == nil {
				rel3()
			} else if want := `volume "v": ` + string(tc.want) + " refused, " + string(tc.held) + " in progress: conflicting operation in progress"; err.Error() != want {
				t.Fatalf("error %q, want %q", err, want)
			}
			rel()
			rel() // idempotent
			if s := l.inFlight(); s != "" {
				t.Fatalf("in flight after release: %s", s)
			}
			rel4, err := l.acquire("v", tc.want)
			if err != nil {
				t.Fatalf("after release: %v", err)
			}
			rel4()
		})
	}
}
