/* C-level unit test of native/: the bitmap functions against a plain bool
 * array, and the write path's copy-on-write against an in-memory model,
 * including several threads writing at once while snapshots start.
 * Built and run by tests/unit/test_native_c.py; exit status 0 = pass. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <pthread.h>
#include "prepl.h"

#define CHECK(c) do { if (!(c)) { fprintf (stderr, "%s:%d: %s\n", __FILE__, \
                                            __LINE__, #c); exit (1); } } while (0)

static uint64_t seed = 88172645463325252ULL;
static uint64_t
rnd (void)
{
  seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
  return seed;
}

static void
test_bitmap (void)
{
  enum { N = 1000 };
  uint64_t map[(N + 63) / 64] = { 0 }, starts[N], lens[N];
  char model[N] = { 0 };
  int round, i;

  for (round = 0; round < 2000; round++) {
    uint64_t first = rnd () % N, count = rnd () % (N - first + 1), from;
    int64_t want = -1;
    size_t nruns, k;
    uint64_t n = 0;
    if (rnd () % 3) {
      pr_bm_set_range (map, first, count);
      memset (model + first, 1, count);
    }
    else {
      pr_bm_clear_range (map, first, count);
      memset (model + first, 0, count);
    }
    for (i = 0; i < N; i++) {
      CHECK (pr_bm_test (map, i) == model[i]);
      n += model[i];
    }
    CHECK (pr_bm_count (map, N) == n);
    for (i = first; i < N; i++)
      if (model[i]) { want = i; break; }
    CHECK (pr_bm_next_set (map, N, first) == want);
    want = -1;
    for (i = first; i < N; i++)
      if (!model[i]) { want = i; break; }
    CHECK (pr_bm_next_clear (map, N, first) == want);
    from = 0;
    nruns = pr_bm_runs (map, N, &from, starts, lens, N);
    CHECK (from == N);
    n = 0;
    for (k = 0; k < nruns; k++) {
      CHECK (starts[k] == 0 || !model[starts[k] - 1]);
      for (i = starts[k]; i < (int)(starts[k] + lens[k]); i++)
        CHECK (model[i]);
      CHECK (starts[k] + lens[k] == N || !model[starts[k] + lens[k]]);
      n += lens[k];
    }
    CHECK (n == pr_bm_count (map, N));
  }
}

/* ---- write path ---- */

enum { REGION_SHIFT = 14, BLOCK_SHIFT = 10, SIZE = (1 << 20) + 3000 };
static pr_volume *vol;

static int
tmpfile_of (uint64_t size)
{
  char path[] = "/tmp/prepl-test-XXXXXX";
  int fd = mkstemp (path);
  CHECK (fd >= 0);
  unlink (path);
  CHECK (ftruncate (fd, size) == 0);
  return fd;
}

static uint64_t *maps[16];
static int nmaps;

static uint64_t *
map_of (uint64_t nbits)
{
  uint64_t *m = calloc ((nbits + 63) / 64, 8);
  CHECK (m && nmaps < 16);
  return maps[nmaps++] = m;
}

struct writer { int id; unsigned char *model; };

static void *
writer_main (void *arg)
{
  struct writer *w = arg;
  char buf[70000];
  int i;
  for (i = 0; i < 300; i++) {
    /* each writer owns every 4th 64 KiB stripe of the volume */
    uint64_t len = 1 + rnd () % 40000;
    uint64_t stripe = (rnd () % (SIZE / 65536 / 4)) * 4 + w->id;
    uint64_t off = stripe * 65536 + rnd () % (65536 - (len % 65536));
    if (off + len > SIZE)
      continue;
    memset (buf, 'a' + w->id + (i % 7), len);
    CHECK (pr_write (vol, buf, len, off, 0) == 0);
  }
  return NULL;
}

static void
test_write_path (void)
{
  uint64_t nregions = ((SIZE - 1) >> REGION_SHIFT) + 1;
  uint64_t nblocks = ((SIZE - 1) >> BLOCK_SHIFT) + 1;
  int vfd = tmpfile_of (SIZE), afd = tmpfile_of (0), i;
  unsigned char *before = malloc (SIZE), *after = malloc (SIZE), *img = malloc (SIZE);
  pr_snap *snap;
  pthread_t th[4];
  struct writer ws[4];

  for (i = 0; i < SIZE; i++)
    before[i] = (unsigned char)rnd ();
  CHECK (pwrite (vfd, before, SIZE, 0) == SIZE);
  vol = pr_volume_new (vfd, SIZE, REGION_SHIFT, BLOCK_SHIFT, afd, 22, 4096);
  CHECK (vol);
  CHECK (pr_volume_switch (vol, map_of (nregions), map_of (nblocks), map_of (nblocks),
                           NULL) == 0);
  snap = pr_snap_new (tmpfile_of (SIZE), map_of (nblocks));
  CHECK (snap);
  CHECK (pr_volume_switch (vol, map_of (nregions), map_of (nblocks), map_of (nblocks),
                           snap) == 0);

  for (i = 0; i < 4; i++) {
    ws[i].id = i;
    CHECK (pthread_create (&th[i], NULL, writer_main, &ws[i]) == 0);
  }
  for (i = 0; i < 4; i++)
    CHECK (pthread_join (th[i], NULL) == 0);
  CHECK (pr_zero (vol, 5000, SIZE - 5000, 0) == 0);
  CHECK (pr_write (vol, "x", 1, SIZE, 0) == -22);            /* past the end */
  CHECK (pr_snap_read (vol, snap, (char *)img, SIZE, 0) == 0);
  CHECK (memcmp (img, before, SIZE) == 0);                   /* the old image */
  CHECK (pr_read (vol, (char *)after, SIZE, 0) == 0);
  CHECK (memcmp (after + SIZE - 5000, img, 0) == 0);
  for (i = SIZE - 5000; i < SIZE; i++)
    CHECK (after[i] == 0);
  CHECK (pr_volume_max_writers (vol) >= 1);
  CHECK (pr_al_trim (vol) == 0);
  pr_volume_drop_snap (vol, snap);
  pr_snap_release (vol, snap);
  CHECK (pr_snap_read (vol, snap, (char *)img, 4096, 0) == -116);   /* ESTALE */
  pr_volume_close (vol);
  CHECK (pr_write (vol, "x", 1, 0, 0) == -108);                     /* ESHUTDOWN */
  pr_snap_free (snap);
  pr_volume_free (vol);
  free (before); free (after); free (img);
  while (nmaps > 0)
    free (maps[--nmaps]);
  close (vfd);
  close (afd);
}

/* A switch undone (its record failed): the older maps hold the union of
 * both intervals, with the zero rule of pr_bm_merge_interval, and writes
 * after it land in the older maps; the snapshot it started is no longer
 * copied into. */
static void
test_unswitch (void)
{
  uint64_t nregions = ((SIZE - 1) >> REGION_SHIFT) + 1;
  uint64_t nblocks = ((SIZE - 1) >> BLOCK_SHIFT) + 1;
  int vfd = tmpfile_of (SIZE), afd = tmpfile_of (0);
  uint64_t *oc = map_of (nregions), *ob = map_of (nblocks), *oz = map_of (nblocks);
  uint64_t *nc = map_of (nregions), *nb = map_of (nblocks), *nz = map_of (nblocks);
  uint64_t *snap_vmap_of_test = map_of (nblocks);
  pr_snap *snap;
  char buf[1024];

  vol = pr_volume_new (vfd, SIZE, REGION_SHIFT, BLOCK_SHIFT, afd, 22, 4096);
  CHECK (vol);
  CHECK (pr_volume_switch (vol, oc, ob, oz, NULL) == 0);
  CHECK (pr_zero (vol, 3 << BLOCK_SHIFT, 0, 0) == 0);         /* blocks 0-2 zeroed */
  snap = pr_snap_new (tmpfile_of (SIZE), snap_vmap_of_test);
  CHECK (snap && pr_volume_switch (vol, nc, nb, nz, snap) == 0);
  memset (buf, 'n', sizeof buf);
  CHECK (pr_write (vol, buf, sizeof buf, 1 << BLOCK_SHIFT, 0) == 0);   /* block 1 */
  CHECK (pr_zero (vol, 1 << BLOCK_SHIFT, 40 << BLOCK_SHIFT, 0) == 0);  /* block 40 */
  CHECK (pr_bm_test (snap_vmap_of_test, 1));
  pr_volume_unswitch (vol, oc, ob, oz, snap);
  CHECK (pr_bm_test (ob, 0) && pr_bm_test (oz, 0));    /* zeroed, untouched after */
  CHECK (pr_bm_test (ob, 1) && !pr_bm_test (oz, 1));   /* zeroed, then written */
  CHECK (pr_bm_test (ob, 40) && pr_bm_test (oz, 40));  /* zeroed in the newer */
  CHECK (!pr_bm_test (ob, 41) && pr_bm_test (oc, 0) && pr_bm_test (oc, 40 >> 4));
  CHECK (pr_write (vol, buf, sizeof buf, 60 << BLOCK_SHIFT, 0) == 0);
  CHECK (pr_bm_test (ob, 60) && !pr_bm_test (nb, 60)); /* the older maps are open */
  CHECK (!pr_bm_test (snap_vmap_of_test, 60));         /* no copy-on-write any more */
  pr_snap_release (vol, snap);
  pr_snap_free (snap);
  pr_volume_free (vol);
  while (nmaps > 0)
    free (maps[--nmaps]);
  close (vfd);
  close (afd);
}

/* A snapshot of changes: it holds only the blocks of its need maps (an
 * older union and the block map of the interval its switch closes).  A
 * write copies a block into it only if the block is held; reads of held
 * blocks give the old image, reads of others fail with EIO, and a write
 * of a block outside them copies nothing. */
static void
test_snapshot_of_changes (void)
{
  uint64_t nregions = ((SIZE - 1) >> REGION_SHIFT) + 1;
  uint64_t nblocks = ((SIZE - 1) >> BLOCK_SHIFT) + 1;
  uint64_t bs = (uint64_t)1 << BLOCK_SHIFT;
  int vfd = tmpfile_of (SIZE), afd = tmpfile_of (0), i;
  uint64_t *older = map_of (nblocks), *ob = map_of (nblocks);
  uint64_t *vmap = map_of (nblocks);
  unsigned char *before = malloc (SIZE), *img = malloc (SIZE);
  char buf[4096];
  pr_snap *snap;

  for (i = 0; i < SIZE; i++)
    before[i] = (unsigned char)rnd ();
  CHECK (pwrite (vfd, before, SIZE, 0) == SIZE);
  vol = pr_volume_new (vfd, SIZE, REGION_SHIFT, BLOCK_SHIFT, afd, 22, 4096);
  CHECK (vol);
  CHECK (pr_volume_switch (vol, map_of (nregions), ob, map_of (nblocks), NULL) == 0);
  /* the closing interval writes blocks 3 and 4; an older one changed 10 */
  memcpy (buf, before + 3 * bs, bs);       /* same bytes: the image stays `before` */
  CHECK (pr_write (vol, buf, bs, 3 * bs, 0) == 0);
  memcpy (buf, before + 4 * bs, bs);
  CHECK (pr_write (vol, buf, bs, 4 * bs, 0) == 0);
  pr_bm_set_range (older, 10, 1);
  snap = pr_snap_new (tmpfile_of (SIZE), vmap);
  CHECK (snap);
  pr_snap_set_need (snap, older, ob);
  CHECK (pr_volume_switch (vol, map_of (nregions), map_of (nblocks), map_of (nblocks),
                           snap) == 0);
  /* after the switch: blocks 2-11 rewritten (one write), block 20 too */
  memset (img, 'w', 10 * bs);
  CHECK (pr_write (vol, (char *)img, 10 * bs, 2 * bs, 0) == 0);
  CHECK (pr_write (vol, (char *)img, bs, 20 * bs, 0) == 0);
  for (i = 0; i < (int)nblocks; i++)       /* copied: held blocks that changed */
    CHECK (!!pr_bm_test (vmap, i) == (i == 3 || i == 4 || i == 10));
  CHECK (pr_snap_read (vol, snap, (char *)img, 2 * bs, 3 * bs) == 0);
  CHECK (memcmp (img, before + 3 * bs, 2 * bs) == 0);
  CHECK (pr_snap_read (vol, snap, (char *)img, bs, 10 * bs) == 0);
  CHECK (memcmp (img, before + 10 * bs, bs) == 0);
  CHECK (pr_snap_read (vol, snap, (char *)img, bs, 2 * bs) == -5);          /* EIO */
  CHECK (pr_snap_read (vol, snap, (char *)img, 3 * bs, 3 * bs) == -5);      /* 3-5 */
  CHECK (pr_snap_read (vol, snap, (char *)img, bs, 30 * bs) == -5);         /* unwritten */
  /* a block held but never written since reads from the volume */
  pr_bm_set_range (older, 40, 1);
  CHECK (pr_snap_read (vol, snap, (char *)img, bs, 40 * bs) == 0);
  CHECK (memcmp (img, before + 40 * bs, bs) == 0);
  pr_volume_drop_snap (vol, snap);
  pr_snap_release (vol, snap);
  pr_snap_free (snap);
  pr_volume_free (vol);
  free (before); free (img);
  while (nmaps > 0)
    free (maps[--nmaps]);
  close (vfd);
  close (afd);
}

int
main (void)
{
  CHECK (pr_abi_version () > 0);
  test_bitmap ();
  test_write_path ();
  test_unswitch ();
  test_snapshot_of_changes ();
  printf ("native tests passed\n");
  return 0;
}
