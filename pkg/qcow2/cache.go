package qcow2

import (
	"container/list"
	"slices"
)

// tableCache is a write-back LRU cache of fixed-size metadata pieces (L2
// slices or refcount blocks), keyed by host byte offset. It is not safe for
// concurrent use: the Image metadata lock guards it.
type tableCache struct {
	entrySize int
	capacity  int
	entries   map[int64]*list.Element
	lru       list.List // front = most recently used; values are *cacheEntry
	// writeback writes a dirty entry before it is evicted; it must respect
	// the flush ordering rules (see Image.writeL2Slice / writeRefBlock).
	writeback func(e *cacheEntry) error
}

type cacheEntry struct {
	off   int64
	buf   []byte
	dirty bool
	pins  int // entries in use by the caller are never evicted
}

func newTableCache(entrySize, capacity int, wb func(*cacheEntry) error) *tableCache {
	if capacity < 4 {
		capacity = 4
	}
	return &tableCache{entrySize: entrySize, capacity: capacity, entries: map[int64]*list.Element{}, writeback: wb}
}

// get returns the cached entry for off, or nil.
func (c *tableCache) get(off int64) *cacheEntry {
	el, ok := c.entries[off]
	if !ok {
		return nil
	}
	c.lru.MoveToFront(el)
	return el.Value.(*cacheEntry)
}

// put inserts a new entry for off with buf (len entrySize), evicting the
// least recently used unpinned entry when full.
func (c *tableCache) put(off int64, buf []byte, dirty bool) (*cacheEntry, error) {
	if el, ok := c.entries[off]; ok {
		e := el.Value.(*cacheEntry)
		e.buf, e.dirty = buf, e.dirty || dirty
		c.lru.MoveToFront(el)
		return e, nil
	}
	for len(c.entries) >= c.capacity {
		victim := c.lru.Back()
		for victim != nil && victim.Value.(*cacheEntry).pins > 0 {
			victim = victim.Prev()
		}
		if victim == nil {
			break // everything pinned: grow temporarily
		}
		ve := victim.Value.(*cacheEntry)
		if ve.dirty {
			if err := c.writeback(ve); err != nil {
				return nil, err
			}
			ve.dirty = false
		}
		c.lru.Remove(victim)
		delete(c.entries, ve.off)
	}
	e := &cacheEntry{off: off, buf: buf, dirty: dirty}
	c.entries[off] = c.lru.PushFront(e)
	return e, nil
}

// drop forgets an entry (its cluster was freed); dirty contents are lost on
// purpose.
func (c *tableCache) drop(off int64) {
	if el, ok := c.entries[off]; ok {
		c.lru.Remove(el)
		delete(c.entries, off)
	}
}

// dropRange forgets every entry inside [off, off+n).
func (c *tableCache) dropRange(off, n int64) {
	for k := off; k < off+n; k += int64(c.entrySize) {
		c.drop(k)
	}
}

// dirtyEntries returns the dirty entries in ascending offset order.
func (c *tableCache) dirtyEntries() []*cacheEntry {
	var out []*cacheEntry
	for el := c.lru.Front(); el != nil; el = el.Next() {
		if e := el.Value.(*cacheEntry); e.dirty {
			out = append(out, e)
		}
	}
	sortEntries(out)
	return out
}

// clear empties the cache (after a repair rewrote the tables).
func (c *tableCache) clear() {
	c.entries = map[int64]*list.Element{}
	c.lru.Init()
}

func sortEntries(es []*cacheEntry) {
	slices.SortFunc(es, func(a, b *cacheEntry) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
}
