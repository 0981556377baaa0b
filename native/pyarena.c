/* A small cache in front of CPython's arena allocator (the allocator behind
 * pymalloc's arenas and, since 3.11, the frame stacks of thread states).
 *
 * Why: nbdkit's python plugin runs every callback on an nbdkit thread that
 * has no Python thread state, so each callback creates one and deletes it
 * again.  Each new thread state maps a 16 KiB frame stack (mmap, page
 * faults) and each deletion unmaps it; the munmap shoots the TLB down on
 * every other CPU the process runs on (an IPI each, which the caller waits
 * for).  That was ~13 % of a primary server's CPU at 8000 writes/s, and it
 * is on every write's path.  Freed blocks of up to PR_ARENA_CACHE_MAX_SIZE
 * are kept here (at most PR_ARENA_CACHE_SLOTS) and handed out again for the
 * same size; everything else goes to the allocator that was installed
 * before.  Memory kept: at most SLOTS * MAX_SIZE (1 MiB). */
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "prepl.h"

#define PR_ARENA_CACHE_SLOTS 16
#define PR_ARENA_CACHE_MAX_SIZE (64 * 1024)

static pr_arena_allocator next;         /* the allocator installed before */
static int hooked;
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { void *p; size_t size; } cache[PR_ARENA_CACHE_SLOTS];
static int ncached;
static uint64_t hits, misses;

static void *
arena_alloc (void *ctx, size_t size)
{
  void *p = NULL;
  int i;
  (void)ctx;
  if (size <= PR_ARENA_CACHE_MAX_SIZE) {
    pthread_mutex_lock (&cache_lock);
    for (i = ncached - 1; i >= 0; i--)
      if (cache[i].size == size) {
        p = cache[i].p;
        cache[i] = cache[--ncached];
        hits++;
        break;
      }
    if (p == NULL)
      misses++;
    pthread_mutex_unlock (&cache_lock);
    if (p)
      return p;
  }
  return next.alloc (next.ctx, size);
}

static void
arena_free (void *ctx, void *p, size_t size)
{
  (void)ctx;
  if (p != NULL && size <= PR_ARENA_CACHE_MAX_SIZE) {
    pthread_mutex_lock (&cache_lock);
    if (ncached < PR_ARENA_CACHE_SLOTS) {
      cache[ncached].p = p;
      cache[ncached].size = size;
      ncached++;
      p = NULL;
    }
    pthread_mutex_unlock (&cache_lock);
    if (p == NULL)
      return;
  }
  next.free (next.ctx, p, size);
}

int
pr_arena_hook (pr_arena_allocator *a)
{
  if (a == NULL || a->alloc == NULL || a->free == NULL)
    return -EINVAL;
  if (hooked || a->alloc == arena_alloc)
    return -EALREADY;
  next = *a;
  a->ctx = NULL;
  a->alloc = arena_alloc;
  a->free = arena_free;
  hooked = 1;
  return 0;
}

void
pr_arena_stats (uint64_t *out)
{
  pthread_mutex_lock (&cache_lock);
  out[0] = hits;
  out[1] = misses;
  out[2] = (uint64_t)ncached;
  pthread_mutex_unlock (&cache_lock);
}
