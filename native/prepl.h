/* prepl native API: bitmaps over caller-provided memory and the write path.
 *
 * This header has no preprocessor lines on purpose: native/build_ffi.py
 * feeds the same text to cffi's cdef(), so what C compiles and what Python
 * sees cannot drift apart.  Callers include <stdint.h> and <stddef.h> first.
 *
 * All lengths and bit indexes are checked by the single Python module that
 * calls this library (replication/native.py); the C functions assume their
 * ranges are inside the maps they are given.  Functions that do I/O return
 * 0 or a negative errno.
 */

/* Bumped whenever a signature or a struct changes; checked at import. */
int pr_abi_version(void);

/* ---- bitmaps: an array of uint64_t words, bit i is (w[i/64] >> (i%64)) & 1.
 * set/clear/or/andnot are atomic per word, so several threads may set bits
 * of the same map at once. */
void pr_bm_set_range(uint64_t *map, uint64_t first, uint64_t count);
void pr_bm_clear_range(uint64_t *map, uint64_t first, uint64_t count);
int pr_bm_test(const uint64_t *map, uint64_t bit);
uint64_t pr_bm_count(const uint64_t *map, uint64_t nbits);
int64_t pr_bm_next_set(const uint64_t *map, uint64_t nbits, uint64_t from);
int64_t pr_bm_next_clear(const uint64_t *map, uint64_t nbits, uint64_t from);
/* Extracts up to max runs of set bits starting the search at *from; stores
 * run starts and lengths; sets *from to where the next call must continue
 * (nbits when the map is exhausted).  Returns the number of runs stored. */
size_t pr_bm_runs(const uint64_t *map, uint64_t nbits, uint64_t *from,
                  uint64_t *starts, uint64_t *lengths, size_t max);
void pr_bm_or(uint64_t *dst, const uint64_t *src, uint64_t nwords);
void pr_bm_andnot(uint64_t *dst, const uint64_t *src, uint64_t nwords);
/* Folds interval (src_*) into the interval that follows it (dst_*): the
 * change and block maps are OR-ed; the zero map keeps dst's bit where dst
 * wrote the block and takes src's bit elsewhere. */
void pr_bm_merge_interval(uint64_t *dst_c, uint64_t *dst_b, uint64_t *dst_z,
                          const uint64_t *src_c, const uint64_t *src_b,
                          const uint64_t *src_z,
                          uint64_t ncwords, uint64_t nbwords);

/* ---- the tracked volume (write path) ---- */
typedef struct pr_volume pr_volume;
typedef struct pr_snap pr_snap;

/* vol_fd and al_fd stay owned by the caller.  region, block and AL extent
 * sizes are powers of two with block <= region <= al_extent.  The activity
 * log's bitmap lives at al_offset in al_fd; it starts empty (the caller
 * folds an old log into the maps before creating the volume).  Returns NULL
 * with errno set on failure. */
pr_volume *pr_volume_new(int vol_fd, uint64_t size, uint32_t region_shift,
                         uint32_t block_shift, int al_fd, uint32_t al_shift,
                         uint64_t al_offset);
void pr_volume_free(pr_volume *v);
/* Drains in-flight writes; from then on every write, zero and trim fails
 * with -ESHUTDOWN (the server is stopping and its maps are final). */
void pr_volume_close(pr_volume *v);
/* Drains in-flight writes; from then on every write, zero and trim fails
 * with -err (EROFS: a superseded primary is fenced), or succeeds again
 * (err 0).  A closed volume stays closed. */
void pr_volume_refuse_writes(pr_volume *v, int err);

/* Atomically, with respect to in-flight writes (they drain first): install
 * new open maps and, if snap is not NULL, start that snapshot.  All maps
 * must stay mapped until replaced.  Resets the activity log's in-memory
 * "durable" set so that writes of the new interval mark their extents
 * again.  Returns 0 or -errno (-ENOSPC: too many active snapshots). */
int pr_volume_switch(pr_volume *v, uint64_t *cmap, uint64_t *bmap,
                     uint64_t *zmap, pr_snap *snap);
/* Undoes the last switch, whose durable record could not be written: the
 * maps of the interval it closed (cmap, bmap, zmap) become the open maps
 * again, holding the union of both intervals, and snap (if not NULL)
 * leaves the active snapshots (free it with pr_snap_release).  Under the
 * same exclusive lock as a switch. */
void pr_volume_unswitch(pr_volume *v, uint64_t *cmap, uint64_t *bmap,
                        uint64_t *zmap, pr_snap *snap);
/* Merges a closed interval's maps into the open interval (under the same
 * exclusive lock as a switch). */
void pr_volume_merge_open(pr_volume *v, const uint64_t *cmap,
                          const uint64_t *bmap, const uint64_t *zmap);
/* Stops copy-on-write into snap; it stays readable until invalidated. */
void pr_volume_drop_snap(pr_volume *v, pr_snap *snap);

/* Write path.  flags as nbdkit's NBDKIT_FLAG_* (no translation needed). */
#define PR_MAY_TRIM 1
#define PR_FUA 2
#define PR_FAST_ZERO 8
/* At most this many snapshots are active (copied into) at once. */
#define PR_MAX_SNAPS 64
int pr_write(pr_volume *v, const char *buf, uint64_t len, uint64_t off,
             uint32_t flags);
int pr_zero(pr_volume *v, uint64_t len, uint64_t off, uint32_t flags);
int pr_trim(pr_volume *v, uint64_t len, uint64_t off, uint32_t flags);
int pr_read(pr_volume *v, char *buf, uint64_t len, uint64_t off);
int pr_flush(pr_volume *v);
/* A failed fdatasync of the volume (in a flush, a FUA write or a
 * snappoint) is sticky: pr_flush reports it from then on.  0 if none. */
int pr_volume_sync_error(pr_volume *v);
/* Records err as such a failure (for a sync failed outside C). */
void pr_volume_sync_failed(pr_volume *v, int err);

/* After a snappoint's record: the activity log on disk becomes the extents
 * touched since the last switch and in the closed intervals whose data may
 * not be durable yet (see pr_volume_durable). */
int pr_al_trim(pr_volume *v);
/* fdatasync of the volume (failures sticky, as pr_flush) that makes the
 * data of every interval closed before the call durable: on success their
 * extents leave the set pr_al_trim keeps (on failure they stay).  One at a
 * time; returns 0 or -errno. */
int pr_volume_durable(pr_volume *v);
/* Extents of closed intervals whose data may not be durable yet. */
uint64_t pr_volume_al_pending(pr_volume *v);
/* Copies the in-memory activity log (as on disk) into out. */
void pr_al_get(pr_volume *v, uint64_t *out, uint64_t nwords);

/* Statistics.  pr_volume_pauses: how long (ns) writers arriving during
 * each of the last switches waited (from the switch's request for the
 * epoch to its release: the writes in flight end first), the most recent
 * first, at most max of the last 1024 into out; returns the number of
 * switches so far. */
uint64_t pr_volume_pauses(pr_volume *v, uint64_t *out, size_t max);
uint64_t pr_volume_max_writers(pr_volume *v);
uint64_t pr_volume_writers(pr_volume *v);
uint64_t pr_volume_al_syncs(pr_volume *v);
uint64_t pr_volume_writes_total(pr_volume *v);  /* writes, zeroes, trims served */

/* Copies n ranges of lengths[i] bytes from src_fd at src_offsets[i] (NULL:
 * at offsets[i]) to dst_fd at offsets[i]; zero != 0 writes zeroes instead
 * (src_fd and src_offsets unused).  Returns 0 or -errno.  Used by the
 * secondary's apply. */
int pr_copy_ranges(int src_fd, int dst_fd, const uint64_t *src_offsets,
                   const uint64_t *offsets, const uint64_t *lengths, size_t n,
                   int zero);

/* Starts writeback of [off, off + len) of fd without waiting for it
 * (sync_file_range SYNC_FILE_RANGE_WRITE), so a later fdatasync has less
 * to wait for.  Returns 0 or -errno. */
int pr_start_writeback(int fd, uint64_t off, uint64_t len);

/* msync(MS_SYNC) of a shared mapping (addr page-aligned), called without
 * the GIL: Python's mmap.flush holds it through the whole sync, stopping
 * every other thread of the process (the server's writes among them).
 * Returns 0 or -errno. */
int pr_sync_mapping(void *addr, uint64_t len);

/* The secondary's staged write, whole, without the GIL: hashes len bytes
 * of buf (XXH3-128, canonical big-endian, into hash[16]), writes them at
 * off of fd, then marks blocks [b0, b0 + nb) as data (set in data_map,
 * cleared in zero_map; atomic per word).  The caller checks that the ranges
 * fit.  Returns 0 or -errno (the maps are left alone when the write fails). */
int pr_stage_write(int fd, const void *buf, uint64_t len, uint64_t off,
                   uint64_t *data_map, uint64_t *zero_map, uint64_t b0,
                   uint64_t nb, unsigned char *hash);

/* A batch of staged writes in one call: entry i is lens[i] bytes of data
 * (the entries' data back to back) for offs[i] of the replica, its blocks
 * (of `block` bytes) marked as pr_stage_write does, its hash into
 * hashes + 16 * i.  at == PR_IN_PLACE: entry i is written at offs[i] of
 * fd; else the whole data is written at `at` of fd in one write (a
 * staging log).  The caller checks that every range fits the maps and that
 * the lengths add up.  Returns 0 or -errno; *done is the number of entries
 * written and marked (all of them on success). */
#define PR_IN_PLACE 0xffffffffffffffff   /* pr_stage_batch: at the entries' offsets */
int pr_stage_batch(int fd, const unsigned char *data, const uint64_t *offs,
                   const uint64_t *lens, size_t n, uint64_t at,
                   uint64_t *data_map, uint64_t *zero_map, uint64_t block,
                   unsigned char *hashes, size_t *done);

/* Tests only: arms a named fault point of the write path; when a write
 * reaches it the process exits with status 99 (a crash).  0 disarms. */
#define PR_FAULT_AL_BEFORE_WRITE 1   /* a new extent's bit, before the log write */
#define PR_FAULT_AL_AFTER_SYNC 2     /* after the log write and its fdatasync */
void pr_volume_set_fault(pr_volume *v, int point);

/* ---- snapshots ---- */
/* snap_fd: sparse file of the volume's size holding copied blocks; vmap:
 * the valid map (bit per block).  Both stay owned by the caller and must
 * live until pr_snap_free. */
pr_snap *pr_snap_new(int snap_fd, uint64_t *vmap);
void pr_snap_free(pr_snap *s);
/* Before the snapshot is started (pr_volume_switch): it holds only the
 * blocks set in need0 or need1 (either may be NULL; both NULL, the
 * default: every block).  Copy-on-write skips the others, and a read of
 * one that was not copied fails with -EIO.  The maps must stay mapped
 * and unchanged but for added bits until pr_snap_free; need1 may be the
 * block map of the interval the switch closes (frozen from then on). */
void pr_snap_set_need(pr_snap *s, const uint64_t *need0, const uint64_t *need1);
/* Reads the image of the volume at the snapshot's instant.  -ESTALE once
 * the snapshot is invalid. */
int pr_snap_read(pr_volume *v, pr_snap *s, char *buf, uint64_t len,
                 uint64_t off);
/* n snapshot reads in one call: lens[i] bytes at offs[i] into buf + pos[i]
 * (the caller checks that each fits buf).  0 or the first -errno. */
int pr_snap_read_segments(pr_volume *v, pr_snap *s, char *buf,
                          const uint64_t *pos, const uint64_t *offs,
                          const uint64_t *lens, size_t n);
int pr_snap_valid(pr_snap *s);
/* errno of the copy-on-write failure that invalidated it (0 if none). */
int pr_snap_error(pr_snap *s);
void pr_snap_invalidate(pr_snap *s, int err);
/* Invalidates s, waits for readers inside it to leave (they take the region
 * locks), then closes its file: the space of a deleted snapshot file is
 * freed now, not when the last client disconnects.  The caller must have
 * dropped s from the volume's active snapshots first. */
void pr_snap_release(pr_volume *v, pr_snap *s);

/* ---- CPython's arena allocator (native/pyarena.c) ---- */
/* Same layout as CPython's PyObjectArenaAllocator. */
typedef struct {
  void *ctx;
  void *(*alloc)(void *ctx, size_t size);
  void (*free)(void *ctx, void *ptr, size_t size);
} pr_arena_allocator;
/* a holds the allocator installed now (PyObject_GetArenaAllocator); it is
 * kept as the one behind the cache and a is overwritten with the cache's,
 * to be installed with PyObject_SetArenaAllocator.  -EALREADY if done. */
int pr_arena_hook(pr_arena_allocator *a);
/* out[0..2]: cache hits, misses, blocks held now. */
void pr_arena_stats(uint64_t *out);
