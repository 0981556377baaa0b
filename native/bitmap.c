/* Bitmaps over caller-provided memory (the maps are files mapped into
 * memory).  Bit i lives in word i/64 at position i%64.  Writers that set or
 * clear bits use atomic read-modify-write on whole words, so two threads
 * setting different bits of one word never lose either bit; readers use
 * plain loads (a reader racing a writer sees the bit either way, which is
 * all the write path needs: it orders its own bit before its data).
 */
#include <stdint.h>
#include <stddef.h>
#include "prepl.h"

#define WORD(i) ((i) >> 6)
#define BIT(i) ((uint64_t)1 << ((i) & 63))

/* Mask of bits [lo, hi) inside one word, 0 <= lo < hi <= 64. */
static inline uint64_t
span_mask (unsigned lo, unsigned hi)
{
  uint64_t m = hi == 64 ? ~(uint64_t)0 : (((uint64_t)1 << hi) - 1);
  return m & ~(((uint64_t)1 << lo) - 1);
}

static void
apply_range (uint64_t *map, uint64_t first, uint64_t count, int set)
{
  uint64_t end = first + count;
  while (first < end) {
    unsigned lo = first & 63;
    uint64_t word_end = (first | 63) + 1;
    unsigned hi = end < word_end ? (unsigned)(end & 63) : 64;
    uint64_t m = span_mask (lo, hi);
    if (set) {
      if ((__atomic_load_n (&map[WORD (first)], __ATOMIC_RELAXED) & m) != m)
        __atomic_fetch_or (&map[WORD (first)], m, __ATOMIC_SEQ_CST);
    }
    else
      __atomic_fetch_and (&map[WORD (first)], ~m, __ATOMIC_SEQ_CST);
    first = word_end;
  }
}

void
pr_bm_set_range (uint64_t *map, uint64_t first, uint64_t count)
{
  apply_range (map, first, count, 1);
}

void
pr_bm_clear_range (uint64_t *map, uint64_t first, uint64_t count)
{
  apply_range (map, first, count, 0);
}

int
pr_bm_test (const uint64_t *map, uint64_t bit)
{
  return (__atomic_load_n (&map[WORD (bit)], __ATOMIC_SEQ_CST) & BIT (bit)) != 0;
}

uint64_t
pr_bm_count (const uint64_t *map, uint64_t nbits)
{
  uint64_t n = 0, i, full = nbits >> 6;
  for (i = 0; i < full; i++)
    n += __builtin_popcountll (map[i]);
  if (nbits & 63)
    n += __builtin_popcountll (map[full] & span_mask (0, nbits & 63));
  return n;
}

/* Next bit at or after from whose value is want (words are inverted for 0). */
static int64_t
next_bit (const uint64_t *map, uint64_t nbits, uint64_t from, int want)
{
  uint64_t flip = want ? 0 : ~(uint64_t)0;
  uint64_t i, w;
  if (from >= nbits)
    return -1;
  i = WORD (from);
  w = (map[i] ^ flip) & ~(BIT (from) - 1);
  for (;;) {
    if (w) {
      uint64_t bit = (i << 6) + (uint64_t)__builtin_ctzll (w);
      return bit < nbits ? (int64_t)bit : -1;
    }
    if (++i > WORD (nbits - 1))
      return -1;
    w = map[i] ^ flip;
  }
}

int64_t
pr_bm_next_set (const uint64_t *map, uint64_t nbits, uint64_t from)
{
  return next_bit (map, nbits, from, 1);
}

int64_t
pr_bm_next_clear (const uint64_t *map, uint64_t nbits, uint64_t from)
{
  return next_bit (map, nbits, from, 0);
}

size_t
pr_bm_runs (const uint64_t *map, uint64_t nbits, uint64_t *from,
            uint64_t *starts, uint64_t *lengths, size_t max)
{
  size_t n = 0;
  uint64_t pos = *from;
  while (n < max) {
    int64_t s = next_bit (map, nbits, pos, 1);
    int64_t e;
    if (s < 0) {
      pos = nbits;
      break;
    }
    e = next_bit (map, nbits, (uint64_t)s, 0);
    if (e < 0)
      e = (int64_t)nbits;
    starts[n] = (uint64_t)s;
    lengths[n] = (uint64_t)(e - s);
    n++;
    pos = (uint64_t)e;
  }
  *from = pos;
  return n;
}

void
pr_bm_or (uint64_t *dst, const uint64_t *src, uint64_t nwords)
{
  uint64_t i;
  for (i = 0; i < nwords; i++)
    if (src[i] & ~dst[i])
      __atomic_fetch_or (&dst[i], src[i], __ATOMIC_SEQ_CST);
}

void
pr_bm_andnot (uint64_t *dst, const uint64_t *src, uint64_t nwords)
{
  uint64_t i;
  for (i = 0; i < nwords; i++)
    if (src[i] & dst[i])
      __atomic_fetch_and (&dst[i], ~src[i], __ATOMIC_SEQ_CST);
}

void
pr_bm_merge_interval (uint64_t *dst_c, uint64_t *dst_b, uint64_t *dst_z,
                      const uint64_t *src_c, const uint64_t *src_b,
                      const uint64_t *src_z, uint64_t ncwords, uint64_t nbwords)
{
  uint64_t i;
  pr_bm_or (dst_c, src_c, ncwords);
  for (i = 0; i < nbwords; i++) {
    uint64_t db = dst_b[i];
    dst_z[i] = (dst_z[i] & db) | (src_z[i] & ~db);
    dst_b[i] = db | src_b[i];
  }
}
