package throttle_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

func TestParseList(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    throttle.Limits
		wantErr string
	}{
		{in: "writeIOPS=200,writeIOPSBurst=400,readBytesPerSecond=10M",
			want: throttle.Limits{WriteIOPS: throttle.Rate{Avg: 200, Burst: 400}, ReadBytes: throttle.Rate{Avg: 10 << 20}}},
		{in: "writeBytesPerSecond=1k,writeBytesPerSecondBurst=2G", want: throttle.Limits{WriteBytes: throttle.Rate{Avg: 1 << 10, Burst: 2 << 30}}},
		{in: "writeIOPS=0", want: throttle.Limits{}},
		{in: "writeIOPS=1,writeIOPS=2", wantErr: "writeIOPS given twice"},
		{in: "writeIOPS", wantErr: `"writeIOPS" is not KEY=VALUE`},
		{in: "iops=2", wantErr: `unknown parameter "iops" (known: readIOPS, readIOPSBurst, writeIOPS, writeIOPSBurst, readBytesPerSecond, readBytesPerSecondBurst, writeBytesPerSecond, writeBytesPerSecondBurst)`},
		{in: "writeIOPS=+5", wantErr: `parameter writeIOPS="+5": want a whole number of operations per second`},
		{in: "writeIOPS=-0", wantErr: `parameter writeIOPS="-0"`},
		{in: "readBytesPerSecond=+1M", wantErr: `parameter readBytesPerSecond="+1M": want a whole number of bytes per second`},
		{in: "readBytesPerSecond=M", wantErr: `parameter readBytesPerSecond="M"`},
		{in: "readBytesPerSecond=1Mi", wantErr: `parameter readBytesPerSecond="1Mi"`},
		{in: "readBytesPerSecond=1000000000G", wantErr: `at most 1000000000000000`},
		{in: "writeIOPSBurst=5", wantErr: "writeIOPSBurst=5 needs writeIOPS"},
	} {
		got, err := throttle.ParseList(tc.in)
		switch {
		case tc.wantErr == "" && (err != nil || got != tc.want):
			t.Errorf("%s: %+v, %v; want %+v", tc.in, got, err, tc.want)
		case tc.wantErr != "" && (err == nil || !errors.Is(err, throttle.ErrInvalid) || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%s: error %v, want ErrInvalid saying %q", tc.in, err, tc.wantErr)
		}
	}
}
