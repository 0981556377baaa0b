/* LD_PRELOAD shim for tests: every fsync, fdatasync, msync and syncfs
 * sleeps PREPL_SLOW_SYNC_MS milliseconds (default 200) before it does its
 * work, as on a disk that takes that long to flush.  Used to show that no
 * write waits for a sync it does not need (tests/integration/
 * test_switch_pause.py). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void
slow (void)
{
  const char *ms = getenv ("PREPL_SLOW_SYNC_MS");
  long n = ms ? atol (ms) : 200;
  struct timespec ts = { n / 1000, (n % 1000) * 1000000L };
  nanosleep (&ts, NULL);
}

int
fsync (int fd)
{
  static int (*real) (int);
  if (!real)
    real = (int (*) (int)) dlsym (RTLD_NEXT, "fsync");
  slow ();
  return real (fd);
}

int
fdatasync (int fd)
{
  static int (*real) (int);
  if (!real)
    real = (int (*) (int)) dlsym (RTLD_NEXT, "fdatasync");
  slow ();
  return real (fd);
}

int
msync (void *addr, size_t len, int flags)
{
  static int (*real) (void *, size_t, int);
  if (!real)
    real = (int (*) (void *, size_t, int)) dlsym (RTLD_NEXT, "msync");
  slow ();
  return real (addr, len, flags);
}

int
syncfs (int fd)
{
  static int (*real) (int);
  if (!real)
    real = (int (*) (int)) dlsym (RTLD_NEXT, "syncfs");
  slow ();
  return real (fd);
}
