package throttle

import (
	"errors"
	"fmt"
)

// MaxValue bounds every rate and burst, as QEMU's THROTTLE_VALUE_MAX does:
// far above any device, and low enough that float64 arithmetic on bytes
// stays exact to the byte.
const MaxValue = 1_000_000_000_000_000

// Rate is one limit: Avg units (operations or bytes) per second on average,
// and bursts of up to Burst units after the volume was quiet. Zero Avg is no
// limit. Zero Burst is a tenth of a second's worth (QEMU's default bucket).
type Rate struct {
	Avg   int64 `json:"avg"`
	Burst int64 `json:"burst,omitempty"`
}

// size is the bucket's capacity in units.
func (r Rate) size() float64 {
	if r.Burst > 0 {
		return float64(r.Burst)
	}
	return float64(r.Avg) / 10
}

// Limits are a volume's limits, per direction. The zero value is unlimited.
type Limits struct {
	ReadIOPS   Rate `json:"readIOPS"`
	WriteIOPS  Rate `json:"writeIOPS"`
	ReadBytes  Rate `json:"readBytesPerSecond"`
	WriteBytes Rate `json:"writeBytesPerSecond"`
}

// Unlimited reports whether l limits nothing.
func (l Limits) Unlimited() bool { return l == Limits{} }

// ErrInvalid is wrapped by the errors of Check and Set.
var ErrInvalid = errors.New("invalid throttle limit")

// Check refuses negative or huge values and a burst without an average. The
// errors name the rate name and its burst name+"Burst", as in
// "writeIOPSBurst=5 needs writeIOPS". A burst below its average is fine:
// Burst is the bucket's size, what may pass at once after a quiet spell
// (in the first second after one, up to Burst+Avg pass), and the default
// bucket is a tenth of a second's worth. (QEMU refuses iops-max below iops
// because its max is a rate over a burst length, not a size.)
func (r Rate) Check(name string) error {
	switch {
	case r.Avg < 0 || r.Avg > MaxValue:
		return fmt.Errorf("%w: %s=%d is not in [0, %d]", ErrInvalid, name, r.Avg, int64(MaxValue))
	case r.Burst < 0 || r.Burst > MaxValue:
		return fmt.Errorf("%w: %sBurst=%d is not in [0, %d]", ErrInvalid, name, r.Burst, int64(MaxValue))
	case r.Burst > 0 && r.Avg == 0:
		return fmt.Errorf("%w: %sBurst=%d needs %s: a burst is above an average limit", ErrInvalid, name, r.Burst, name)
	}
	return nil
}

// Names of the rates, as their JSON fields: the driver's parameter keys.
const (
	NameReadIOPS   = "readIOPS"
	NameWriteIOPS  = "writeIOPS"
	NameReadBytes  = "readBytesPerSecond"
	NameWriteBytes = "writeBytesPerSecond"
)

// Rates lists l's rates by name, reads then writes, IOPS then bytes.
func (l *Limits) Rates() []NamedRate {
	return []NamedRate{{NameReadIOPS, &l.ReadIOPS}, {NameWriteIOPS, &l.WriteIOPS}, {NameReadBytes, &l.ReadBytes}, {NameWriteBytes, &l.WriteBytes}}
}

// NamedRate is one of a Limits' rates and its name.
type NamedRate struct {
	Name string
	Rate *Rate
}

// Check checks every rate of l.
func (l Limits) Check() error {
	for _, r := range l.Rates() {
		if err := r.Rate.Check(r.Name); err != nil {
			return err
		}
	}
	return nil
}
