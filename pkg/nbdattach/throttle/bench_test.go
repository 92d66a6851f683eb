package throttle_test

import (
	"context"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

// nopBackend does no I/O: what remains is the throttle's own cost.
type nopBackend struct{}

func (nopBackend) Size() int64                                        { return 1 << 30 }
func (nopBackend) ReadAt(context.Context, []byte, int64) error        { return nil }
func (nopBackend) WriteAt(context.Context, []byte, int64, bool) error { return nil }
func (nopBackend) Flush(context.Context) error                        { return nil }
func (nopBackend) Trim(context.Context, int64, int64) error           { return nil }
func (nopBackend) WriteZeroes(context.Context, int64, int64, nbdattach.ZeroFlags) error {
	return nil
}

// BenchmarkRequest is the cost of one 4 KiB request on its way to a
// backend that does nothing, from all GOMAXPROCS goroutines at once:
// direct (no throttle: what -tags nothrottle builds), unlimited (the
// shipped path of a volume without limits) and limited (limits that never
// make a request wait). Compare with the tens of microseconds a request
// takes through a device (tests/bench/attach.sh QOS=1).
func BenchmarkRequest(b *testing.B) {
	huge := throttle.Rate{Avg: throttle.MaxValue}
	for _, bc := range []struct {
		name   string
		limits *throttle.Limits // nil: no throttle at all
	}{
		{"direct", nil},
		{"unlimited", &throttle.Limits{}},
		{"limited", &throttle.Limits{ReadIOPS: huge, WriteIOPS: huge, ReadBytes: huge, WriteBytes: huge}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var be nbdattach.Backend = nopBackend{}
			if bc.limits != nil {
				var th *throttle.Throttle
				be, th = throttle.Wrap(be)
				if err := th.Set(*bc.limits); err != nil {
					b.Fatal(err)
				}
			}
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, 4096)
				ctx := context.Background()
				for i := 0; pb.Next(); i++ {
					var err error
					if i%2 == 0 {
						err = be.ReadAt(ctx, buf, 0)
					} else {
						err = be.WriteAt(ctx, buf, 0, false)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}
