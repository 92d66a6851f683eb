package throttle

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// Limits are written as key=value parameters: the driver's mutable
// parameters (a VolumeAttributesClass's) and `qcow2-csi attach --limits`.
// Each rate's key is its name (readIOPS, writeIOPS, readBytesPerSecond,
// writeBytesPerSecond) and its burst's the name + BurstSuffix. Values are
// whole numbers without a sign; bytes take a k, K, M or G (binary) suffix;
// 0 lifts the limit.
const BurstSuffix = "Burst"

// Params are parsed parameters: rate or burst key to value. A key they do
// not hold is left as it is by Apply.
type Params map[string]int64

// Keys lists the parameter keys, for error messages.
func Keys() string {
	var ks []string
	for _, r := range (&Limits{}).Rates() {
		ks = append(ks, r.Name, r.Name+BurstSuffix)
	}
	return strings.Join(ks, ", ")
}

// ParseParams checks the keys and the syntax of the values of p; whether
// the limits they make make sense together is Apply's. Errors wrap
// ErrInvalid and name the key. also are keys the caller took out of p
// itself, for the list of known keys in the error of an unknown one.
func ParseParams(p map[string]string, also ...string) (Params, error) {
	ks := make([]string, 0, len(p))
	for k := range p {
		ks = append(ks, k)
	}
	sort.Strings(ks) // report the first bad key deterministically
	c := Params{}
	for _, k := range ks {
		n, err := parseValue(k, p[k], also)
		if err != nil {
			return nil, err
		}
		c[k] = n
	}
	return c, nil
}

// ParseList parses "key=value,key=value" (`qcow2-csi attach --limits`) into
// the Limits it sets. A key given twice is refused.
func ParseList(s string) (Limits, error) {
	kv := map[string]string{}
	for _, f := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return Limits{}, fmt.Errorf("%w: %q is not KEY=VALUE", ErrInvalid, f)
		}
		if _, dup := kv[k]; dup {
			return Limits{}, fmt.Errorf("%w: %s given twice", ErrInvalid, k)
		}
		kv[k] = v
	}
	c, err := ParseParams(kv)
	if err != nil {
		return Limits{}, err
	}
	return c.Apply(Limits{})
}

func parseValue(k, val string, also []string) (int64, error) {
	name := strings.TrimSuffix(k, BurstSuffix)
	bytes := name == NameReadBytes || name == NameWriteBytes
	if !bytes && name != NameReadIOPS && name != NameWriteIOPS {
		return 0, fmt.Errorf("%w: unknown parameter %q (known: %s)", ErrInvalid, k, strings.Join(append([]string{Keys()}, also...), ", "))
	}
	num, mult := val, int64(1)
	if bytes && num != "" {
		switch num[len(num)-1] {
		case 'k', 'K':
			num, mult = num[:len(num)-1], 1<<10
		case 'M':
			num, mult = num[:len(num)-1], 1<<20
		case 'G':
			num, mult = num[:len(num)-1], 1<<30
		}
	}
	var n int64
	var err error
	if num == "" || num[0] < '0' || num[0] > '9' {
		// ParseInt takes a sign: "+5" and "-0" are not whole numbers as a
		// class's author writes them.
		err = strconv.ErrSyntax
	} else {
		n, err = strconv.ParseInt(num, 10, 64)
	}
	if err != nil || n > MaxValue/mult {
		unit := "operations per second"
		if bytes {
			unit = "bytes per second, with an optional k, K, M or G suffix"
		}
		if strings.HasSuffix(k, BurstSuffix) {
			unit = "the most " + unit + " after a quiet spell"
		}
		return 0, fmt.Errorf("%w: parameter %s=%q: want a whole number of %s, at most %d (0: no limit)",
			ErrInvalid, k, val, unit, int64(MaxValue))
	}
	return n * mult, nil
}

// Apply is l with c's values set, checked as a whole (a burst needs its
// rate): the error names the keys. A rate and its burst are one setting: a
// rate named without its burst gets the default burst, not the one sized
// for the old rate (from writeIOPS=1000 writeIOPSBurst=2000, writeIOPS=200
// must not keep a 10 s burst).
func (c Params) Apply(l Limits) (Limits, error) {
	for _, r := range l.Rates() {
		if n, ok := c[r.Name]; ok {
			*r.Rate = Rate{Avg: n}
		}
		if n, ok := c[r.Name+BurstSuffix]; ok {
			r.Rate.Burst = n
		}
	}
	return l, l.Check()
}
