/* The secondary's side of a transfer: staged writes (hashed as they
 * arrive, written, marked in the staging's data and zero maps), the start
 * of their writeback, and the copy of a staging into the replica (apply).
 * Each is one call without the GIL; replication/native.py checks every
 * range and length before calling (the C side trusts them, see prepl.h).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
#include <fcntl.h>
#define XXH_INLINE_ALL
#include <xxhash.h>
#include "prepl.h"
#include "fileio.h"

int
pr_start_writeback (int fd, uint64_t off, uint64_t len)
{
  if (off > INT64_MAX || len > INT64_MAX - off)
    return -EINVAL;
  return sync_file_range (fd, (off64_t)off, (off64_t)len,
                          SYNC_FILE_RANGE_WRITE) == -1 ? -errno : 0;
}

int
pr_sync_mapping (void *addr, uint64_t len)
{
  return msync (addr, len, MS_SYNC) == -1 ? -errno : 0;
}

int
pr_stage_write (int fd, const void *buf, uint64_t len, uint64_t off,
                uint64_t *data_map, uint64_t *zero_map, uint64_t b0,
                uint64_t nb, unsigned char *hash)
{
  XXH128_canonical_t c;
  int r;
  if (off > INT64_MAX || len > INT64_MAX - off)
    return -EINVAL;
  XXH128_canonicalFromHash (&c, XXH3_128bits (buf, (size_t)len));
  memcpy (hash, c.digest, sizeof c.digest);
  r = pwrite_full (fd, buf, len, off);
  if (r < 0)
    return r;
  pr_bm_clear_range (zero_map, b0, nb);
  pr_bm_set_range (data_map, b0, nb);
  return 0;
}

static void
mark_data (uint64_t *data_map, uint64_t *zero_map, uint64_t off, uint64_t len,
           uint64_t block)
{
  uint64_t b0 = off / block;
  uint64_t nb = (off % block + len + block - 1) / block;
  pr_bm_clear_range (zero_map, b0, nb);
  pr_bm_set_range (data_map, b0, nb);
}

int
pr_stage_batch (int fd, const unsigned char *data, const uint64_t *offs,
                const uint64_t *lens, size_t n, uint64_t at,
                uint64_t *data_map, uint64_t *zero_map, uint64_t block,
                unsigned char *hashes, size_t *done)
{
  uint64_t pos = 0;
  size_t i;

  *done = 0;
  if (block == 0)
    return -EINVAL;
  if (at != PR_IN_PLACE) {
    XXH128_canonical_t c;
    uint64_t total = 0;
    int r;
    for (i = 0; i < n; i++)
      total += lens[i];
    if (at > INT64_MAX || total > INT64_MAX - at)
      return -EINVAL;
    r = pwrite_full (fd, (const char *)data, total, at);
    if (r < 0)
      return r;
    for (i = 0; i < n; i++) {
      XXH128_canonicalFromHash (&c, XXH3_128bits (data + pos, (size_t)lens[i]));
      memcpy (hashes + 16 * i, c.digest, sizeof c.digest);
      mark_data (data_map, zero_map, offs[i], lens[i], block);
      pos += lens[i];
    }
    *done = n;
    return 0;
  }
  for (i = 0; i < n; i++) {
    uint64_t b0 = offs[i] / block;
    uint64_t nb = (offs[i] % block + lens[i] + block - 1) / block;
    int r = pr_stage_write (fd, data + pos, lens[i], offs[i], data_map,
                            zero_map, b0, nb, hashes + 16 * i);
    if (r < 0)
      return r;
    pos += lens[i];
    *done = i + 1;
  }
  return 0;
}

int
pr_copy_ranges (int src_fd, int dst_fd, const uint64_t *src_offsets,
                const uint64_t *offsets, const uint64_t *lengths, size_t n,
                int zero)
{
  const uint64_t chunk = 1 << 20;
  char *buf = malloc (chunk);
  size_t i;
  int r = 0;

  if (!buf)
    return -ENOMEM;
  if (zero)
    memset (buf, 0, chunk);
  for (i = 0; i < n && r == 0; i++) {
    uint64_t off = offsets[i], end = offsets[i] + lengths[i];
    uint64_t src = src_offsets ? src_offsets[i] : off;
    while (off < end && r == 0) {
      uint64_t len = end - off < chunk ? end - off : chunk;
      if (!zero)
        r = pread_full (src_fd, buf, len, src);
      if (r == 0)
        r = pwrite_full (dst_fd, buf, len, off);
      off += len;
      src += len;
    }
  }
  free (buf);
  return r;
}
