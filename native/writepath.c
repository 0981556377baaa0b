/* The write path of a tracked volume: one call per NBD write, zero or trim.
 *
 * Per call, in this order:
 *
 *   1. Activity log (AL).  The volume is divided into coarse AL extents
 *      (e.g. 4 MiB).  Before any byte of an extent can be written, that
 *      extent's bit must be durable in the AL file: the first write to an
 *      extent since the last switch sets the bit, writes the page and
 *      fdatasyncs the log (al_lock serialises this slow path); later writes
 *      see the bit in al_mem and pay nothing.  A snappoint trims the log
 *      to the extents written in the new interval and in every closed one
 *      whose data may not be durable yet (pr_volume_durable), so hot
 *      extents stay in it and pay nothing either.  After an unclean stop every
 *      extent in the log is treated as changed, so no change bit is ever
 *      lost although the change maps themselves are never fsynced per
 *      write (they are mapped memory made durable at snappoints).
 *   2. Region locks.  Each region maps to one of NSTRIPES mutexes; the call
 *      holds the mutexes of all regions it touches (taken in ascending
 *      stripe order) until it is done.  This makes copy-on-write, map
 *      updates and the data write of a region atomic against other
 *      modifications and against snapshot reads of that region, while
 *      writes to other regions proceed in parallel.
 *   3. Copy-on-write, at block granularity (like LVM's 4 KiB chunks), into
 *      every active, valid snapshot whose valid map lacks a touched block:
 *      read the old blocks, write them to the snapshot file (skipped when
 *      all zeroes: the file is sparse), then set the valid bits.  A 4 KiB
 *      write so copies 4 KiB, not its 64 KiB region.  A failure
 *      invalidates that snapshot only; the client's write goes on.
 *   4. Maps: change map (region bits) and block map (block bits) are set,
 *      and the zero map bits of the touched blocks are cleared, before the
 *      data is written; a zero/trim sets the zero bits of the blocks it
 *      covers entirely only after the data operation succeeded.
 *   5. Data, then fdatasync if FUA.
 *
 * Snappoint creation (pr_volume_switch) takes the epoch rwlock exclusively;
 * every write holds it shared from its maps to its data, so a write lies
 * entirely in one interval and entirely before or after a snapshot's
 * instant.  The rwlock prefers writers so a switch is never starved.
 * Writers arriving during a switch wait for it (the pause, recorded per
 * switch: pr_volume_pauses), and the switch waits for the writes inside
 * the epoch; so no write waits on a disk inside it: the activity log's
 * fdatasync happens before the epoch (marked again inside, normally from
 * memory), a FUA write's after it, and the log's trim at a snappoint
 * never holds the lock a write needs while it writes (al_io below).  The
 * volume's lifetime (close, fence) is a lock of its own (gate), held by a
 * write throughout.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <fcntl.h>
#include <pthread.h>
#include <time.h>
#include <linux/falloc.h>
#include "prepl.h"
#include "fileio.h"

#define PR_ABI 15
#define NSTRIPES 1024
#define AL_PAGE 4096
#define NPAUSES 1024           /* switch pauses kept (a ring) */

enum op { OP_WRITE, OP_ZERO, OP_TRIM };

struct pr_snap {
  int fd;
  uint64_t *vmap;
  const uint64_t *need[2];      /* NULL, NULL: the whole image (pr_snap_set_need) */
  int err;                      /* atomic: 0 while valid */
};

struct pr_volume {
  int fd;
  uint64_t size;
  uint32_t rshift, bshift, alshift;
  uint64_t nregions, nblocks, nextents, al_words;
  pthread_rwlock_t gate;         /* lifetime: close and fence drain writes */
  pthread_rwlock_t epoch;
  pthread_mutex_t stripes[NSTRIPES];
  uint64_t *cmap, *bmap, *zmap; /* open interval; replaced under epoch */
  pr_snap *snaps[PR_MAX_SNAPS];    /* active snapshots; changed under epoch */
  int nsnaps;
  int al_fd;
  uint64_t al_offset;
  pthread_mutex_t al_lock;       /* the sets below; held for memory work only */
  pthread_mutex_t al_io;        /* a log write: al_file changes only under it */
  uint64_t *al_file;            /* every bit durable on disk (under al_lock) */
  uint64_t *al_mem;             /* durable and touched since the switch */
  uint64_t *al_pending;         /* touched in closed intervals since the
                                   * last pr_volume_durable began */
  uint64_t *al_wait;            /* what the pr_volume_durable in progress
                                   * makes durable (under al_lock) */
  pthread_mutex_t durable_lock; /* one pr_volume_durable at a time */
  uint64_t *al_buf;             /* the pages being written (under al_io) */
  uint64_t pauses[NPAUSES];     /* ns writers waited at the last switches */
  uint64_t npauses;             /* switches recorded (under epoch, exclusive) */
  uint64_t writers, max_writers, al_syncs, writes;  /* atomic counters */
  int refuse;                   /* errno of every write (0: none); set under epoch (exclusive) */
  int fault;                    /* armed fault point (tests), atomic */
  int sync_err;                 /* atomic: errno of a failed fdatasync, sticky */
};

int
pr_abi_version (void)
{
  return PR_ABI;
}

pr_volume *
pr_volume_new (int vol_fd, uint64_t size, uint32_t region_shift,
               uint32_t block_shift, int al_fd, uint32_t al_shift,
               uint64_t al_offset)
{
  pr_volume *v;
  pthread_rwlockattr_t attr;
  int i;

  if (size == 0 || block_shift < 9 || block_shift > region_shift
      || region_shift > al_shift || al_shift > 40) {
    errno = EINVAL;
    return NULL;
  }
  v = calloc (1, sizeof *v);
  if (!v)
    return NULL;
  v->fd = vol_fd;
  v->size = size;
  v->rshift = region_shift;
  v->bshift = block_shift;
  v->alshift = al_shift;
  v->nregions = ((size - 1) >> region_shift) + 1;
  v->nblocks = ((size - 1) >> block_shift) + 1;
  v->nextents = ((size - 1) >> al_shift) + 1;
  /* whole AL pages, so a page write never reads past the buffers */
  v->al_words = ((v->nextents + AL_PAGE * 8 - 1) / (AL_PAGE * 8)) * (AL_PAGE / 8);
  v->al_fd = al_fd;
  v->al_offset = al_offset;
  v->al_file = calloc (v->al_words, 8);
  v->al_mem = calloc (v->al_words, 8);
  v->al_pending = calloc (v->al_words, 8);
  v->al_wait = calloc (v->al_words, 8);
  v->al_buf = calloc (v->al_words, 8);
  if (!v->al_file || !v->al_mem || !v->al_pending || !v->al_wait || !v->al_buf) {
    free (v->al_file); free (v->al_mem); free (v->al_pending); free (v->al_wait);
    free (v->al_buf);
    free (v);
    errno = ENOMEM;
    return NULL;
  }
  pthread_rwlockattr_init (&attr);
  pthread_rwlockattr_setkind_np (&attr,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&v->epoch, &attr);
  pthread_rwlock_init (&v->gate, &attr);
  pthread_rwlockattr_destroy (&attr);
  for (i = 0; i < NSTRIPES; i++)
    pthread_mutex_init (&v->stripes[i], NULL);
  pthread_mutex_init (&v->al_lock, NULL);
  pthread_mutex_init (&v->al_io, NULL);
  pthread_mutex_init (&v->durable_lock, NULL);
  return v;
}

void
pr_volume_free (pr_volume *v)
{
  if (!v)
    return;
  free (v->al_file);
  free (v->al_mem);
  free (v->al_pending);
  free (v->al_wait);
  free (v->al_buf);
  free (v);
}

static uint64_t
now_ns (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t
pr_volume_pauses (pr_volume *v, uint64_t *out, size_t max)
{
  uint64_t n, i, k;
  pthread_rwlock_rdlock (&v->epoch);
  n = v->npauses;
  k = n < NPAUSES ? n : NPAUSES;
  if (k > max)
    k = max;
  for (i = 0; i < k; i++)       /* the most recent first */
    out[i] = v->pauses[(n - 1 - i) % NPAUSES];
  pthread_rwlock_unlock (&v->epoch);
  return n;
}

int
pr_volume_switch (pr_volume *v, uint64_t *cmap, uint64_t *bmap,
                  uint64_t *zmap, pr_snap *snap)
{
  int r = 0;
  uint64_t i, t0 = now_ns ();     /* from here on, arriving writers wait */
  pthread_rwlock_wrlock (&v->epoch);
  if (snap && v->nsnaps == PR_MAX_SNAPS)
    r = -ENOSPC;
  else {
    v->cmap = cmap;
    v->bmap = bmap;
    v->zmap = zmap;
    if (snap)
      v->snaps[v->nsnaps++] = snap;
    pthread_mutex_lock (&v->al_lock);
    for (i = 0; i < v->al_words; i++)
      v->al_pending[i] |= v->al_mem[i];
    memset (v->al_mem, 0, v->al_words * 8);
    pthread_mutex_unlock (&v->al_lock);
  }
  v->pauses[v->npauses++ % NPAUSES] = now_ns () - t0;
  pthread_rwlock_unlock (&v->epoch);
  return r;
}

/* Takes snap out of the active snapshots (the caller holds epoch
 * exclusively). */
static void
remove_snap (pr_volume *v, pr_snap *snap)
{
  int i;
  for (i = 0; i < v->nsnaps; i++)
    if (v->snaps[i] == snap) {
      v->snaps[i] = v->snaps[--v->nsnaps];
      v->snaps[v->nsnaps] = NULL;
      return;
    }
}

void
pr_volume_unswitch (pr_volume *v, uint64_t *cmap, uint64_t *bmap,
                    uint64_t *zmap, pr_snap *snap)
{
  uint64_t i, ncw = (v->nregions + 63) / 64, nbw = (v->nblocks + 63) / 64;
  pthread_rwlock_wrlock (&v->epoch);
  /* the union of the two intervals, in the older one's maps: a block is
   * zeroed if the newer interval zeroed it, or the older one did and the
   * newer one did not write it (the rule of pr_bm_merge_interval) */
  for (i = 0; i < ncw; i++)
    cmap[i] |= v->cmap[i];
  for (i = 0; i < nbw; i++) {
    zmap[i] = v->zmap[i] | (zmap[i] & ~v->bmap[i]);
    bmap[i] |= v->bmap[i];
  }
  v->cmap = cmap;
  v->bmap = bmap;
  v->zmap = zmap;
  if (snap)
    remove_snap (v, snap);
  /* every set is durable in the log: the interval goes on with the closed
   * intervals' extents too (more than it touched: kept longer, never lost) */
  pthread_mutex_lock (&v->al_lock);
  for (i = 0; i < v->al_words; i++)
    v->al_mem[i] |= v->al_pending[i];
  pthread_mutex_unlock (&v->al_lock);
  pthread_rwlock_unlock (&v->epoch);
}

/* Sets the errno of every later write once the writes in flight are
 * done, their log and FUA syncs included (the gate); a closed volume stays
 * closed. */
static void
set_refuse (pr_volume *v, int err)
{
  pthread_rwlock_wrlock (&v->gate);
  pthread_rwlock_wrlock (&v->epoch);
  if (v->refuse != ESHUTDOWN)
    __atomic_store_n (&v->refuse, err, __ATOMIC_SEQ_CST);
  pthread_rwlock_unlock (&v->epoch);
  pthread_rwlock_unlock (&v->gate);
}

void
pr_volume_close (pr_volume *v)
{
  set_refuse (v, ESHUTDOWN);
}

void
pr_volume_refuse_writes (pr_volume *v, int err)
{
  set_refuse (v, err);
}

void
pr_volume_merge_open (pr_volume *v, const uint64_t *cmap,
                      const uint64_t *bmap, const uint64_t *zmap)
{
  pthread_rwlock_wrlock (&v->epoch);
  pr_bm_merge_interval (v->cmap, v->bmap, v->zmap, cmap, bmap, zmap,
                        (v->nregions + 63) / 64, (v->nblocks + 63) / 64);
  pthread_rwlock_unlock (&v->epoch);
}

void
pr_volume_drop_snap (pr_volume *v, pr_snap *snap)
{
  pthread_rwlock_wrlock (&v->epoch);
  remove_snap (v, snap);
  pthread_rwlock_unlock (&v->epoch);
}

/* ---- activity log ---- */

/* A named fault point of the write path (tests only, see pr_volume_set_fault):
 * the process ends at once, as in a crash. */
static void
fault_point (pr_volume *v, int point)
{
  if (__atomic_load_n (&v->fault, __ATOMIC_RELAXED) == point)
    _exit (99);
}

void
pr_volume_set_fault (pr_volume *v, int point)
{
  __atomic_store_n (&v->fault, point, __ATOMIC_RELAXED);
}

/* Writes the log's pages holding words [first_word, last_word] from
 * al_buf, then fdatasyncs (the caller holds al_io). */
static int
al_write_pages (pr_volume *v, uint64_t first_word, uint64_t last_word)
{
  const uint64_t wpp = AL_PAGE / 8;
  uint64_t p0 = first_word / wpp, p1 = last_word / wpp;
  int r;

  fault_point (v, PR_FAULT_AL_BEFORE_WRITE);
  r = pwrite_full (v->al_fd, (const char *)(v->al_buf + p0 * wpp),
                   (p1 - p0 + 1) * AL_PAGE, v->al_offset + p0 * AL_PAGE);
  if (r == 0 && fdatasync (v->al_fd) == -1)
    r = -errno;
  if (r == 0)
    __atomic_fetch_add (&v->al_syncs, 1, __ATOMIC_RELAXED);
  fault_point (v, PR_FAULT_AL_AFTER_SYNC);
  return r;
}

/* Extents [e0, e1] durable in the log already (they are in al_file) are
 * marked touched in al_mem; returns whether all of them were (al_lock
 * held). */
static int
al_touch_durable (pr_volume *v, uint64_t e0, uint64_t e1)
{
  uint64_t e;
  for (e = e0; e <= e1; e++)
    if (!pr_bm_test (v->al_file, e))
      return 0;
  pr_bm_set_range (v->al_mem, e0, e1 - e0 + 1);
  return 1;
}

static int
al_mark (pr_volume *v, uint64_t e0, uint64_t e1)
{
  const uint64_t wpp = AL_PAGE / 8;
  uint64_t e, lo, hi;
  int r;

  for (e = e0; e <= e1; e++)
    if (!pr_bm_test (v->al_mem, e))
      break;
  if (e > e1)
    return 0;                   /* fast path: all extents already durable */

  pthread_mutex_lock (&v->al_lock);
  r = al_touch_durable (v, e0, e1);     /* the first touch since a switch */
  pthread_mutex_unlock (&v->al_lock);
  if (r)
    return 0;

  /* a new extent: the log's pages with its bit, written and synced; a
   * write of an extent already in the log never waits for this */
  pthread_mutex_lock (&v->al_io);
  pthread_mutex_lock (&v->al_lock);
  if (al_touch_durable (v, e0, e1)) {   /* another write logged it meanwhile */
    pthread_mutex_unlock (&v->al_lock);
    pthread_mutex_unlock (&v->al_io);
    return 0;
  }
  lo = (e0 / 64 / wpp) * wpp;
  hi = (e1 / 64 / wpp + 1) * wpp;
  memcpy (v->al_buf + lo, v->al_file + lo, (hi - lo) * 8);
  pthread_mutex_unlock (&v->al_lock);
  pr_bm_set_range (v->al_buf, e0, e1 - e0 + 1);
  r = al_write_pages (v, e0 / 64, e1 / 64);
  if (r == 0) {
    pthread_mutex_lock (&v->al_lock);
    pr_bm_set_range (v->al_file, e0, e1 - e0 + 1);
    pr_bm_set_range (v->al_mem, e0, e1 - e0 + 1);
    pthread_mutex_unlock (&v->al_lock);
  }
  pthread_mutex_unlock (&v->al_io);
  return r;
}

int
pr_al_trim (pr_volume *v)
{
  uint64_t i;
  int r;
  pthread_mutex_lock (&v->al_io);
  pthread_mutex_lock (&v->al_lock);
  /* keep the extents of every interval whose data may not be durable yet
   * (closed since the last pr_volume_durable began, or being made durable
   * by one in progress): a snappoint does not fdatasync the volume, so
   * after a power loss those extents may hold less than the secondary
   * was sent, and recovery must count them as changed.  Hot extents so
   * stay in the log across snappoints too.  The new set is a subset of
   * the one on disk, so al_file takes it now: whatever of the write below
   * reached the disk, every bit of al_file is durable. */
  for (i = 0; i < v->al_words; i++)
    v->al_file[i] = v->al_buf[i] = v->al_mem[i] | v->al_pending[i] | v->al_wait[i];
  pthread_mutex_unlock (&v->al_lock);
  r = al_write_pages (v, 0, v->al_words - 1);
  pthread_mutex_unlock (&v->al_io);
  return r;
}

void
pr_al_get (pr_volume *v, uint64_t *out, uint64_t nwords)
{
  pthread_mutex_lock (&v->al_lock);
  memcpy (out, v->al_file, (nwords < v->al_words ? nwords : v->al_words) * 8);
  pthread_mutex_unlock (&v->al_lock);
}

/* ---- region locks ---- */

/* Calls f on the stripes of regions [r0, r1] in ascending stripe order. */
static void
stripes_do (pr_volume *v, uint64_t r0, uint64_t r1,
            int (*f) (pthread_mutex_t *))
{
  uint64_t s, a = r0 % NSTRIPES, b = r1 % NSTRIPES;
  if (r1 - r0 + 1 >= NSTRIPES) {
    for (s = 0; s < NSTRIPES; s++)
      f (&v->stripes[s]);
  }
  else if (a <= b) {
    for (s = a; s <= b; s++)
      f (&v->stripes[s]);
  }
  else {                        /* the range wraps around the stripe table */
    for (s = 0; s <= b; s++)
      f (&v->stripes[s]);
    for (s = a; s < NSTRIPES; s++)
      f (&v->stripes[s]);
  }
}

/* ---- copy-on-write ---- */

static int
all_zero (const char *p, uint64_t n)
{
  static const char z[4096];
  while (n >= sizeof z) {
    if (memcmp (p, z, sizeof z))
      return 0;
    p += sizeof z; n -= sizeof z;
  }
  return memcmp (p, z, n) == 0;
}

/* Does snapshot s hold block b's image (copied, or to be copied before it
 * changes)?  A whole snapshot holds every block; a snapshot of changes only
 * the blocks of its need maps. */
static int
snap_holds (const pr_snap *s, uint64_t b)
{
  if (!s->need[0] && !s->need[1])
    return 1;
  return (s->need[0] && pr_bm_test (s->need[0], b))
    || (s->need[1] && pr_bm_test (s->need[1], b));
}

/* Must b be copied into s before it changes? */
static int
snap_lacks (pr_snap *s, uint64_t b)
{
  return !__atomic_load_n (&s->err, __ATOMIC_SEQ_CST)
    && !pr_bm_test (s->vmap, b) && snap_holds (s, b);
}

/* Does an active snapshot still lack block b? */
static int
cow_needed (pr_volume *v, uint64_t b)
{
  int i;
  for (i = 0; i < v->nsnaps; i++)
    if (snap_lacks (v->snaps[i], b))
      return 1;
  return 0;
}

/* Copies the old contents of blocks [b0, b1] (all needed by some snapshot)
 * into every active snapshot that lacks them.  All-zero runs are not
 * written: the snapshot file is sparse. */
static void
cow_run (pr_volume *v, uint64_t b0, uint64_t b1)
{
  uint64_t off = b0 << v->bshift;
  uint64_t end = (b1 + 1) << v->bshift;
  uint64_t b, s;
  char *buf;
  int i, err;

  if (end > v->size)
    end = v->size;
  /* per call: nbdkit's threads come and go with connections, so a cached
   * per-thread buffer would leak; malloc is cheap next to the I/O */
  buf = malloc (end - off);
  err = buf ? pread_full (v->fd, buf, end - off, off) : -ENOMEM;

  for (i = 0; i < v->nsnaps; i++) {
    pr_snap *sn = v->snaps[i];
    int e = err;
    for (b = b0; b <= b1 && e == 0; ) {
      uint64_t ro, re;
      if (!snap_lacks (sn, b)) {
        b++;
        continue;
      }
      for (s = b; b <= b1 && snap_lacks (sn, b); b++)
        ;
      ro = s << v->bshift;
      re = b << v->bshift;
      if (re > end)
        re = end;
      if (!all_zero (buf + (ro - off), re - ro))
        e = pwrite_full (sn->fd, buf + (ro - off), re - ro, ro);
      if (e == 0)
        pr_bm_set_range (sn->vmap, s, b - s);
    }
    if (e)
      pr_snap_invalidate (sn, -e);
  }
  free (buf);
}

/* Copy-on-write of the blocks [b0, b1] about to be modified, at block
 * granularity: a 4 KiB write copies 4 KiB, not its whole region. */
static void
cow_blocks (pr_volume *v, uint64_t b0, uint64_t b1)
{
  uint64_t b = b0, s;

  if (v->nsnaps == 0)
    return;
  while (b <= b1) {
    while (b <= b1 && !cow_needed (v, b))
      b++;
    if (b > b1)
      break;
    for (s = b; b <= b1 && cow_needed (v, b); b++)
      ;
    cow_run (v, s, b - 1);
  }
}

/* ---- data operations ---- */

static int
zero_data (pr_volume *v, uint64_t len, uint64_t off, int punch, int fast)
{
  static const char zeroes[65536];
  int mode = punch ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                   : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
  if (fallocate (v->fd, mode, (off_t)off, (off_t)len) == 0)
    return 0;
  if (errno != EOPNOTSUPP && errno != ENODEV && errno != EINVAL)
    return -errno;
  if (!punch && fallocate (v->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           (off_t)off, (off_t)len) == 0)
    return 0;
  if (fast)
    return -ENOTSUP;
  while (len > 0) {
    uint64_t n = len < sizeof zeroes ? len : sizeof zeroes;
    int r = pwrite_full (v->fd, zeroes, n, off);
    if (r)
      return r;
    len -= n; off += n;
  }
  return 0;
}

/* fdatasync of the volume.  A failure is sticky: after an EIO the kernel
 * may have dropped the dirty pages and a second fdatasync can succeed
 * although the data is gone, so every later flush reports the first error
 * (until the server restarts and its recovery takes over). */
static int
volume_sync (pr_volume *v)
{
  int e = __atomic_load_n (&v->sync_err, __ATOMIC_SEQ_CST);
  if (e)
    return -e;
  if (fdatasync (v->fd) == 0)
    return 0;
  e = errno;
  pr_volume_sync_failed (v, e);
  return -e;
}

static void
count_in (pr_volume *v)
{
  uint64_t n = __atomic_add_fetch (&v->writers, 1, __ATOMIC_SEQ_CST);
  __atomic_fetch_add (&v->writes, 1, __ATOMIC_RELAXED);
  uint64_t m = __atomic_load_n (&v->max_writers, __ATOMIC_RELAXED);
  while (n > m && !__atomic_compare_exchange_n (&v->max_writers, &m, n, 0,
                                                __ATOMIC_RELAXED,
                                                __ATOMIC_RELAXED))
    ;
}

static int
modify (pr_volume *v, enum op op, const char *buf, uint64_t len,
        uint64_t off, uint32_t flags)
{
  uint64_t r0, r1, b0, b1, zb0, zb1;
  uint64_t bsize = (uint64_t)1 << v->bshift;
  int err;

  if (len == 0)
    return 0;
  if (off > v->size || len > v->size - off)
    return -EINVAL;
  r0 = off >> v->rshift;
  r1 = (off + len - 1) >> v->rshift;
  b0 = off >> v->bshift;
  b1 = (off + len - 1) >> v->bshift;

  count_in (v);
  pthread_rwlock_rdlock (&v->gate);
  err = -__atomic_load_n (&v->refuse, __ATOMIC_SEQ_CST);
  if (err)
    goto out_gate;
  /* the log's I/O, if any, before the epoch: a switch never waits for it;
   * inside, the extents are marked again for the interval the write lies
   * in (from memory: a switch keeps them in the log) */
  err = al_mark (v, off >> v->alshift, (off + len - 1) >> v->alshift);
  if (err)
    goto out_gate;
  pthread_rwlock_rdlock (&v->epoch);
  err = -v->refuse;
  if (err)
    goto out;
  err = al_mark (v, off >> v->alshift, (off + len - 1) >> v->alshift);
  if (err)
    goto out;
  stripes_do (v, r0, r1, pthread_mutex_lock);
  cow_blocks (v, b0, b1);
  pr_bm_set_range (v->cmap, r0, r1 - r0 + 1);
  pr_bm_set_range (v->bmap, b0, b1 - b0 + 1);
  pr_bm_clear_range (v->zmap, b0, b1 - b0 + 1);
  if (op == OP_WRITE)
    err = pwrite_full (v->fd, buf, len, off);
  else
    err = zero_data (v, len, off, op == OP_TRIM || (flags & PR_MAY_TRIM),
                     (flags & PR_FAST_ZERO) != 0);
  if (err == 0 && op != OP_WRITE) {
    /* blocks covered entirely (the last one may end at the volume's end) */
    zb0 = (off + bsize - 1) >> v->bshift;
    zb1 = (off + len == v->size) ? b1 + 1 : (off + len) >> v->bshift;
    if (zb1 > zb0)
      pr_bm_set_range (v->zmap, zb0, zb1 - zb0);
  }
  stripes_do (v, r0, r1, pthread_mutex_unlock);
out:
  pthread_rwlock_unlock (&v->epoch);
  if (err == 0 && (flags & PR_FUA))
    err = volume_sync (v);      /* after the epoch: a switch never waits for it */
out_gate:
  pthread_rwlock_unlock (&v->gate);
  __atomic_sub_fetch (&v->writers, 1, __ATOMIC_SEQ_CST);
  return err;
}

int
pr_write (pr_volume *v, const char *buf, uint64_t len, uint64_t off,
          uint32_t flags)
{
  return modify (v, OP_WRITE, buf, len, off, flags);
}

int
pr_zero (pr_volume *v, uint64_t len, uint64_t off, uint32_t flags)
{
  return modify (v, OP_ZERO, NULL, len, off, flags);
}

int
pr_trim (pr_volume *v, uint64_t len, uint64_t off, uint32_t flags)
{
  return modify (v, OP_TRIM, NULL, len, off, flags);
}

int
pr_read (pr_volume *v, char *buf, uint64_t len, uint64_t off)
{
  if (off > v->size || len > v->size - off)
    return -EINVAL;
  return pread_full (v->fd, buf, len, off);
}

int
pr_flush (pr_volume *v)
{
  return volume_sync (v);
}

int
pr_volume_durable (pr_volume *v)
{
  uint64_t i;
  int r;
  pthread_mutex_lock (&v->durable_lock);
  /* every write of a closed interval completed before its switch, so
   * before this point: the fdatasync below covers all of al_wait */
  pthread_mutex_lock (&v->al_lock);
  for (i = 0; i < v->al_words; i++) {
    v->al_wait[i] |= v->al_pending[i];
    v->al_pending[i] = 0;
  }
  pthread_mutex_unlock (&v->al_lock);
  r = volume_sync (v);
  pthread_mutex_lock (&v->al_lock);
  if (r == 0)
    memset (v->al_wait, 0, v->al_words * 8);
  else                          /* not durable: kept, as if never tried */
    for (i = 0; i < v->al_words; i++) {
      v->al_pending[i] |= v->al_wait[i];
      v->al_wait[i] = 0;
    }
  pthread_mutex_unlock (&v->al_lock);
  pthread_mutex_unlock (&v->durable_lock);
  return r;
}

uint64_t
pr_volume_al_pending (pr_volume *v)
{
  uint64_t i, n = 0;
  pthread_mutex_lock (&v->al_lock);
  for (i = 0; i < v->al_words; i++)
    n += __builtin_popcountll (v->al_pending[i] | v->al_wait[i]);
  pthread_mutex_unlock (&v->al_lock);
  return n;
}

int
pr_volume_sync_error (pr_volume *v)
{
  return __atomic_load_n (&v->sync_err, __ATOMIC_SEQ_CST);
}

void
pr_volume_sync_failed (pr_volume *v, int err)
{
  int zero = 0;
  __atomic_compare_exchange_n (&v->sync_err, &zero, err, 0, __ATOMIC_SEQ_CST,
                               __ATOMIC_SEQ_CST);
}

uint64_t
pr_volume_max_writers (pr_volume *v)
{
  return __atomic_load_n (&v->max_writers, __ATOMIC_RELAXED);
}

uint64_t
pr_volume_writers (pr_volume *v)
{
  return __atomic_load_n (&v->writers, __ATOMIC_RELAXED);
}

uint64_t
pr_volume_writes_total (pr_volume *v)
{
  return __atomic_load_n (&v->writes, __ATOMIC_RELAXED);
}

uint64_t
pr_volume_al_syncs (pr_volume *v)
{
  return __atomic_load_n (&v->al_syncs, __ATOMIC_RELAXED);
}

/* ---- snapshots ---- */

pr_snap *
pr_snap_new (int snap_fd, uint64_t *vmap)
{
  pr_snap *s = calloc (1, sizeof *s);
  if (!s)
    return NULL;
  s->fd = snap_fd;
  s->vmap = vmap;
  return s;
}

void
pr_snap_set_need (pr_snap *s, const uint64_t *need0, const uint64_t *need1)
{
  s->need[0] = need0;
  s->need[1] = need1;
}

void
pr_snap_free (pr_snap *s)
{
  free (s);
}

int
pr_snap_valid (pr_snap *s)
{
  return __atomic_load_n (&s->err, __ATOMIC_SEQ_CST) == 0;
}

int
pr_snap_error (pr_snap *s)
{
  return __atomic_load_n (&s->err, __ATOMIC_SEQ_CST);
}

void
pr_snap_invalidate (pr_snap *s, int err)
{
  int zero = 0;
  __atomic_compare_exchange_n (&s->err, &zero, err ? err : EIO, 0,
                               __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static int
lock_one (pthread_mutex_t *m)
{
  return pthread_mutex_lock (m);
}

static int
unlock_one (pthread_mutex_t *m)
{
  return pthread_mutex_unlock (m);
}

void
pr_snap_release (pr_volume *v, pr_snap *s)
{
  pr_snap_invalidate (s, ESTALE);
  stripes_do (v, 0, NSTRIPES - 1, lock_one);
  if (s->fd >= 0)
    close (s->fd);
  s->fd = -1;
  stripes_do (v, 0, NSTRIPES - 1, unlock_one);
}

int
pr_snap_read (pr_volume *v, pr_snap *s, char *buf, uint64_t len, uint64_t off)
{
  uint64_t end = off + len;
  int err = 0;

  if (off > v->size || len > v->size - off)
    return -EINVAL;
  while (off < end && err == 0) {
    /* one region at a time, under its stripe lock; inside it, runs of
     * blocks from one source (the snapshot's copy or the volume) */
    uint64_t r = off >> v->rshift;
    uint64_t rend = (r + 1) << v->rshift;
    pthread_mutex_t *m = &v->stripes[r % NSTRIPES];
    if (rend > end)
      rend = end;
    pthread_mutex_lock (m);
    while (off < rend && err == 0) {
      uint64_t b = off >> v->bshift;
      int copied = !!pr_bm_test (s->vmap, b);
      uint64_t n;
      if (!pr_snap_valid (s)) {
        err = -ESTALE;
        break;
      }
      if (!copied && !snap_holds (s, b)) {
        err = -EIO;             /* a snapshot of changes holds no image there */
        break;
      }
      do
        b++;
      while ((b << v->bshift) < rend && !!pr_bm_test (s->vmap, b) == copied
             && (copied || snap_holds (s, b)));
      n = (b << v->bshift) - off;
      if (n > rend - off)
        n = rend - off;
      err = pread_full (copied ? s->fd : v->fd, buf, n, off);
      buf += n; off += n;
    }
    pthread_mutex_unlock (m);
  }
  return err;
}

int
pr_snap_read_segments (pr_volume *v, pr_snap *s, char *buf,
                       const uint64_t *pos, const uint64_t *offs,
                       const uint64_t *lens, size_t n)
{
  size_t i;
  int err = 0;

  for (i = 0; i < n && err == 0; i++)
    err = pr_snap_read (v, s, buf + pos[i], lens[i], offs[i]);
  return err;
}
