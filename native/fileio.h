/* Whole-buffer pread/pwrite for the C files of native/ (internal: not part of the
 * cffi interface in prepl.h).  Both return 0 or a negative errno and retry
 * on EINTR and short transfers; pread_full reads zeroes past the end of a
 * short file. */
#ifndef PREPL_FILEIO_H
#define PREPL_FILEIO_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

static inline int
pread_full (int fd, char *buf, uint64_t len, uint64_t off)
{
  while (len > 0) {
    ssize_t r = pread (fd, buf, len, (off_t)off);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0) {               /* past the end of a short file: zeroes */
      memset (buf, 0, len);
      return 0;
    }
    buf += r; len -= (uint64_t)r; off += (uint64_t)r;
  }
  return 0;
}

static inline int
pwrite_full (int fd, const char *buf, uint64_t len, uint64_t off)
{
  while (len > 0) {
    ssize_t r = pwrite (fd, buf, len, (off_t)off);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    buf += r; len -= (uint64_t)r; off += (uint64_t)r;
  }
  return 0;
}

#endif
