package throttle

import "time"

// SetMaxHold sets how long t holds a request back at most.
func SetMaxHold(t *Throttle, d time.Duration) { t.maxHold = d }
