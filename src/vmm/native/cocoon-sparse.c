/*
 * cocoon-sparse: the few things about sparse files that Node cannot do (it has no lseek with
 * SEEK_DATA, no fallocate, no FIEMAP). Built on the host by src/vmm/native/helper.ts; no dependencies.
 *
 *   cocoon-sparse sum FILE...     one line per file: "<xxh64 hex> <non-zero pages> <size>"
 *   cocoon-sparse copy SRC DST [reserve] [sum] [nosync] [into] [-- FILE...]
 *                                 a new DST with SRC's content: a reflink where the filesystem
 *                                 can, else a copy of SRC's data extents only (DST is sparse);
 *                                 with `reserve`, then allocate the rest as `alloc` does; with
 *                                 `sum`, print SRC's checksum line (taken while copying); then
 *                                 the checksum lines of FILEs, as `sum` does; with `nosync`,
 *                                 the data is found with SEEK_DATA instead of a synced FIEMAP
 *                                 (no writeback first: a fork copies a paused VM's RAM this way;
 *                                 pages cached over unwritten extents are copied too, zeros or not);
 *                                 with `into`, DST exists already and is emptied first (a VMM may
 *                                 map it: a restore starts QEMU while the memory is copied), and
 *                                 is left in place on failure
 *   cocoon-sparse snap SRC DST [SRC DST...]
 *                                 prints "ready", waits for a byte on stdin, then copies each SRC
 *                                 to a new DST as `copy SRC DST nosync` does and prints "done":
 *                                 started before a VM is paused, so that the pause holds the
 *                                 copies and not the helper's start
 *   cocoon-sparse alloc FILE      allocate every hole of FILE (fallocate mode 0, size kept);
 *                                 nothing on tmpfs, where that would take RAM at once
 *   cocoon-sparse trim FILE       sync FILE, then punch out its unwritten (allocated, never
 *                                 written) extents: the space `alloc` reserved and nobody used
 *   cocoon-sparse diff BASE MEM OUT [sync] [wait] [threads=N]
 *                                 a new OUT: MEM as a memory diff against BASE (docs/vmm.md
 *                                 "Memory diffs"): the pages where MEM differs from BASE, packed,
 *                                 with a bitmap of which they are; with `sync`, OUT is fdatasynced.
 *                                 Prints OUT's checksum line (as `sum`), then "<diff pages> <pages>".
 *                                 `wait`: prints "ready" once the files are open and waits for a
 *                                 byte on stdin before it reads MEM (a suspend starts it before the
 *                                 pause); `threads=N`: compare on N threads (default 1, at most 4);
 *                                 `narrow`: MEM's pages that may hold data are found with FIEMAP
 *                                 and cachestat(2) (the pages written since its extents were
 *                                 reserved) instead of SEEK_DATA, and where BASE is a hole only
 *                                 MEM is read (checked for zeros)
 *   cocoon-sparse sumheld FILE [sync]
 *                                 FILE opened, "ready", then on a byte on stdin its `sum` line and
 *                                 its fdatasync (exit 5 if that fails)
 *   cocoon-sparse serve           one helper for many held diffs: requests on stdin, answers on
 *                                 stdout, one line each (see `serve` below)
 *   cocoon-sparse undiff BASE DIFF TARGET [reserve] [into] [onbase] [sumbase] [sum] [-- FILE...]
 *                                 a new TARGET with the memory DIFF describes: BASE's data extents
 *                                 copied (as `copy`), DIFF's pages written over them; `reserve` and
 *                                 `into` (TARGET exists and is emptied first) as for copy. `sumbase`: BASE's checksum line (taken while copying);
 *                                 `sum`: then DIFF's (taken before its pages are applied); then the lines of FILEs. Exit 3: DIFF is not a
 *                                 valid diff for BASE (header, sizes, bitmap). `onbase`: TARGET exists and holds BASE's
 *                                 content already (copied ahead by the caller: vmm/qemu/pool.ts); only DIFF's pages are
 *                                 written (no `sumbase` then)
 *   cocoon-sparse map FILE        one line per data range of FILE, "<start> <end>" (bytes,
 *                                 page-aligned, end clamped to the size), as `sum` finds them:
 *                                 what an upload of the file must read (src/snapshots/)
 *
 * Where the data is comes from FIEMAP after a sync (unwritten extents then hold only zeros and
 * are skipped), else from SEEK_DATA/SEEK_HOLE (tmpfs). SEEK_DATA alone would not do on a file
 * with unwritten extents: ext4 reports every page cached there (zeros a guest once read) as data.
 *
 * The checksum of `sum` is defined on the file's content, not its layout. The file is cut into
 * segments of 64 MiB. A segment's digest is XXH64 (seed 0) over, for every 4096-byte page in it
 * that holds a non-zero byte, the page's index in the file as 8 little-endian bytes followed by
 * the page (the file's last one padded with zeros). The checksum is XXH64 over, for every
 * segment with such a page, its index and its digest (8 little-endian bytes each), then the
 * file size. Holes and all-zero pages contribute nothing, so a sparse copy, a reflink and the
 * original have the same checksum, only the data extents are read, and segments are hashed on
 * several cores at once (up to 4): a big guest's memory takes a fraction of the time.
 *
 * Exit status: 0 ok, 28 (ENOSPC) no space, 3 not a valid memory diff, 1 any other error (message on
 * stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>

#define TMPFS_MAGIC 0x01021994

#define PAGE 4096u

/* ---- XXH64 (Yann Collet's algorithm, written from its specification) ---- */
static const uint64_t P1 = 0x9E3779B185EBCA87ULL, P2 = 0xC2B2AE3D27D4EB4FULL, P3 = 0x165667B19E3779F9ULL,
                      P4 = 0x85EBCA77C2B2AE63ULL, P5 = 0x27D4EB2F165667C5ULL;

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t read64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; } /* x86: little-endian */
static inline uint32_t read32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t round64(uint64_t acc, uint64_t input) { acc += input * P2; acc = rotl(acc, 31); return acc * P1; }
static inline uint64_t merge64(uint64_t acc, uint64_t val) { acc ^= round64(0, val); return acc * P1 + P4; }

typedef struct {
  uint64_t total, v[4];
  uint8_t buf[32];
  unsigned buffered;
} xxh64_t;

static void xxh64_init(xxh64_t *s) {
  memset(s, 0, sizeof *s);
  s->v[0] = P1 + P2; s->v[1] = P2; s->v[2] = 0; s->v[3] = -P1;
}

static void xxh64_stripes(xxh64_t *s, const uint8_t *p, size_t n) { /* n is a multiple of 32 */
  uint64_t a = s->v[0], b = s->v[1], c = s->v[2], d = s->v[3];
  for (const uint8_t *end = p + n; p < end; p += 32) {
    a = round64(a, read64(p)); b = round64(b, read64(p + 8)); c = round64(c, read64(p + 16)); d = round64(d, read64(p + 24));
  }
  s->v[0] = a; s->v[1] = b; s->v[2] = c; s->v[3] = d;
}

static void xxh64_update(xxh64_t *s, const void *data, size_t n) {
  const uint8_t *p = data;
  s->total += n;
  if (s->buffered) {
    size_t take = 32 - s->buffered < n ? 32 - s->buffered : n;
    memcpy(s->buf + s->buffered, p, take);
    s->buffered += take; p += take; n -= take;
    if (s->buffered < 32) return;
    xxh64_stripes(s, s->buf, 32);
    s->buffered = 0;
  }
  size_t whole = n & ~(size_t)31;
  xxh64_stripes(s, p, whole);
  memcpy(s->buf, p + whole, n - whole);
  s->buffered = n - whole;
}

static uint64_t xxh64_digest(const xxh64_t *s) {
  uint64_t h;
  if (s->total >= 32) {
    h = rotl(s->v[0], 1) + rotl(s->v[1], 7) + rotl(s->v[2], 12) + rotl(s->v[3], 18);
    for (int i = 0; i < 4; i++) h = merge64(h, s->v[i]);
  } else {
    h = s->v[2] + P5; /* seed + P5 */
  }
  h += s->total;
  const uint8_t *p = s->buf, *end = s->buf + s->buffered;
  for (; p + 8 <= end; p += 8) h = rotl(h ^ round64(0, read64(p)), 27) * P1 + P4;
  if (p + 4 <= end) { h = rotl(h ^ ((uint64_t)read32(p) * P1), 23) * P2 + P3; p += 4; }
  for (; p < end; p++) h = rotl(h ^ (*p * P5), 11) * P1;
  h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
  return h;
}
/* ---- end of XXH64 ---- */

static int fail(const char *what, const char *file) {
  int code = errno == ENOSPC || errno == EDQUOT ? 28 : 1;
  fprintf(stderr, "cocoon-sparse: %s %s: %s\n", what, file, strerror(errno));
  return code;
}

static int all_zero(const uint8_t *p, size_t n) {
  const uint64_t *w = (const uint64_t *)p;
  for (size_t i = 0; i < n / 8; i++) if (w[i]) return 0;
  return 1;
}

static void put_le64(uint8_t out[8], uint64_t v) { for (int i = 0; i < 8; i++) out[i] = (uint8_t)(v >> (8 * i)); }

/* The data ranges of a file, in order: from FIEMAP (unwritten extents skipped), else SEEK_DATA. */
typedef struct {
  int fd;
  uint64_t size, next;
  int mode; /* 0: not started, 1: fiemap, 2: seek_data, 3: whole file */
  struct fiemap *map;
  unsigned index;
  int last;
} ranges_t;

enum { MAP_EXTENTS = 512 };

static int ranges_init(ranges_t *r, int fd, uint64_t size) {
  memset(r, 0, sizeof *r);
  r->fd = fd;
  r->size = size;
  r->map = calloc(1, sizeof(struct fiemap) + MAP_EXTENTS * sizeof(struct fiemap_extent));
  return r->map ? 0 : -1;
}

static int fiemap_fill(ranges_t *r) {
  memset(r->map, 0, sizeof(struct fiemap));
  r->map->fm_start = r->next;
  r->map->fm_length = r->size - r->next;
  r->map->fm_flags = FIEMAP_FLAG_SYNC; /* dirty pages are written first: unwritten then means zeros */
  r->map->fm_extent_count = MAP_EXTENTS;
  r->index = 0;
  return ioctl(r->fd, FS_IOC_FIEMAP, r->map);
}

/* Next data range [*start, *end), page-aligned (end clamped to the size). 1: got one, 0: done, -1: error. */
static int ranges_next(ranges_t *r, uint64_t *start, uint64_t *end) {
  for (;;) {
    if (r->next >= r->size) return 0;
    if (r->mode == 0) {
      if (fiemap_fill(r) == 0) r->mode = 1;
      else if (errno == EOPNOTSUPP || errno == ENOTTY || errno == EINVAL) r->mode = 2;
      else return -1;
    }
    if (r->mode == 1) {
      if (r->index >= r->map->fm_mapped_extents) {
        if (r->last || r->map->fm_mapped_extents == 0) { r->next = r->size; return 0; }
        if (fiemap_fill(r) < 0) return -1;
        if (r->map->fm_mapped_extents == 0) { r->next = r->size; return 0; }
      }
      struct fiemap_extent *e = &r->map->fm_extents[r->index++];
      if (e->fe_flags & FIEMAP_EXTENT_LAST) r->last = 1;
      uint64_t from = e->fe_logical & ~(uint64_t)(PAGE - 1), to = (e->fe_logical + e->fe_length + PAGE - 1) & ~(uint64_t)(PAGE - 1);
      if (to > r->size) to = r->size;
      if (from < r->next) from = r->next;
      if (to > r->next) r->next = to;
      if (e->fe_flags & FIEMAP_EXTENT_UNWRITTEN || from >= to) continue;
      *start = from;
      *end = to;
      return 1;
    }
    if (r->mode == 2) {
      off_t data = lseek(r->fd, (off_t)r->next, SEEK_DATA);
      if (data < 0 && errno == ENXIO) { r->next = r->size; return 0; }
      if (data < 0 && (errno == EINVAL || errno == EOPNOTSUPP)) { r->mode = 3; continue; }
      if (data < 0) return -1;
      off_t hole = lseek(r->fd, data, SEEK_HOLE);
      if (hole < 0) return -1;
      uint64_t from = (uint64_t)data & ~(uint64_t)(PAGE - 1), to = ((uint64_t)hole + PAGE - 1) & ~(uint64_t)(PAGE - 1);
      if (from < r->next) from = r->next;
      if (to > r->size) to = r->size;
      r->next = to;
      *start = from;
      *end = to;
      return 1;
    }
    *start = r->next; /* mode 3: no way to find holes, read it all */
    *end = r->size;
    r->next = r->size;
    return 1;
  }
}

/* Hashes the pages of [start, end) (page-aligned) through the file's mapping (no copy). */
static void sum_range(const uint8_t *map, uint64_t size, uint64_t start, uint64_t end, xxh64_t *s, uint64_t *pages) {
  for (uint64_t at = start; at < end; at += PAGE) {
    const uint8_t *p = map + at;
    uint8_t page[PAGE];
    if (size - at < PAGE) { /* the file's last, partial page: padded with zeros */
      memset(page, 0, PAGE);
      memcpy(page, p, size - at);
      p = page;
    }
    if (all_zero(p, PAGE)) continue;
    uint8_t index[8];
    put_le64(index, at / PAGE);
    xxh64_update(s, index, 8);
    xxh64_update(s, p, PAGE);
    (*pages)++;
  }
}

#define SEGMENT ((uint64_t)64 << 20)
#define MAX_THREADS 4

typedef struct { uint64_t start, end; } range_t;

/* All data ranges of a file, cut at segment boundaries, in order. */
static int collect_ranges_mode(int fd, uint64_t size, range_t **out, size_t *count, int nosync) {
  ranges_t ranges;
  if (ranges_init(&ranges, fd, size) < 0) return -1;
  if (nosync) ranges.mode = 2;
  size_t n = 0, capacity = 64;
  range_t *list = malloc(capacity * sizeof *list);
  uint64_t start, end;
  int got = 0;
  while (list && (got = ranges_next(&ranges, &start, &end)) == 1) {
    while (list && start < end) {
      uint64_t cut = (start / SEGMENT + 1) * SEGMENT;
      uint64_t stop = end < cut ? end : cut;
      if (n == capacity) {
        range_t *bigger = realloc(list, (capacity *= 2) * sizeof *list);
        if (!bigger) { free(list); list = NULL; break; }
        list = bigger;
      }
      list[n++] = (range_t){start, stop};
      start = stop;
    }
  }
  free(ranges.map);
  if (!list || got < 0) { free(list); return -1; }
  *out = list;
  *count = n;
  return 0;
}

static int collect_ranges(int fd, uint64_t size, range_t **out, size_t *count) {
  return collect_ranges_mode(fd, size, out, count, 0);
}

typedef struct {
  const uint8_t *map;
  uint64_t size;
  const range_t *ranges;
  size_t count;
  int out; /* where to write the data too (a copy), or -1 */
  uint64_t *digests, *pages;
  int error;
  pthread_mutex_t lock;
  size_t next; /* the next range to take; a segment's ranges are taken together */
} job_t;

static void *worker(void *arg) {
  job_t *job = arg;
  for (;;) {
    pthread_mutex_lock(&job->lock);
    const size_t first = job->next;
    size_t last = first;
    if (first < job->count) {
      const uint64_t segment = job->ranges[first].start / SEGMENT;
      while (last < job->count && job->ranges[last].start / SEGMENT == segment) last++;
    }
    job->next = last;
    pthread_mutex_unlock(&job->lock);
    if (first >= job->count) return NULL;
    const uint64_t segment = job->ranges[first].start / SEGMENT;
    xxh64_t s;
    xxh64_init(&s);
    uint64_t pages = 0;
    for (size_t i = first; i < last; i++) {
      const range_t r = job->ranges[i];
      sum_range(job->map, job->size, r.start, r.end, &s, &pages);
      for (uint64_t at = r.start; job->out >= 0 && at < r.end;) {
        ssize_t n = pwrite(job->out, job->map + at, r.end - at, (off_t)at);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          pthread_mutex_lock(&job->lock);
          if (!job->error) job->error = n == 0 ? EIO : errno;
          pthread_mutex_unlock(&job->lock);
          break;
        }
        at += (uint64_t)n;
      }
    }
    job->digests[segment] = xxh64_digest(&s);
    job->pages[segment] = pages;
  }
}

/*
 * Prints the checksum line of a mapped file from its data ranges, hashing segments on up to
 * MAX_THREADS threads; with `out` >= 0 the data is written there too, at the same offsets.
 */
static int checksum_ranges(const uint8_t *map, uint64_t size, const range_t *ranges, size_t count, int out, const char *file) {
  const uint64_t segments = size / SEGMENT + 1;
  job_t job = { .map = map, .size = size, .ranges = ranges, .count = count, .out = out };
  job.digests = calloc(segments, sizeof(uint64_t));
  job.pages = calloc(segments, sizeof(uint64_t));
  if (!job.digests || !job.pages) { free(job.digests); free(job.pages); return fail("out of memory for", file); }
  pthread_mutex_init(&job.lock, NULL);
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  const int threads = cpus < 1 ? 1 : cpus > MAX_THREADS ? MAX_THREADS : (int)cpus;
  pthread_t ids[MAX_THREADS];
  int started = 0;
  for (int i = 1; i < threads; i++) if (pthread_create(&ids[started], NULL, worker, &job) == 0) started++;
  worker(&job);
  for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
  pthread_mutex_destroy(&job.lock);
  if (job.error) { errno = job.error; free(job.digests); free(job.pages); return fail("cannot write a copy of", file); }
  xxh64_t s;
  xxh64_init(&s);
  uint64_t pages = 0;
  for (uint64_t k = 0; k < segments; k++) {
    if (!job.pages[k]) continue;
    uint8_t entry[16];
    put_le64(entry, k);
    put_le64(entry + 8, job.digests[k]);
    xxh64_update(&s, entry, 16);
    pages += job.pages[k];
  }
  uint8_t tail[8];
  put_le64(tail, size);
  xxh64_update(&s, tail, 8);
  printf("%016llx %llu %llu\n", (unsigned long long)xxh64_digest(&s), (unsigned long long)pages, (unsigned long long)size);
  free(job.digests);
  free(job.pages);
  return 0;
}

/* Prints the checksum line of an open file (and writes its data to `out` when that is >= 0). */
static int sum_fd(int fd, const char *file, int out) {
  struct stat st;
  if (fstat(fd, &st) < 0) return fail("cannot stat", file);
  const uint64_t size = (uint64_t)st.st_size;
  range_t *ranges = NULL;
  size_t count = 0;
  if (collect_ranges(fd, size, &ranges, &count) < 0) return fail("cannot find the data of", file);
  /* One mapping of the whole file: pages are mapped as they are read, only where data is. */
  const uint8_t *map = size ? mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0) : NULL;
  if (map == MAP_FAILED) { int r = fail("cannot map", file); free(ranges); return r; }
  const int r = checksum_ranges(map, size, ranges, count, out, file);
  if (map) munmap((void *)map, size);
  free(ranges);
  return r;
}

static int sum_file(const char *file) {
  int fd = open(file, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail("cannot open", file);
  int r = sum_fd(fd, file, -1);
  close(fd);
  return r;
}

/* fallocate mode 0 over the whole file: holes become unwritten extents, data stays. */
static int reserve_fd(int fd, const char *file) {
  struct stat st;
  struct statfs fs;
  if (fstat(fd, &st) < 0) return fail("cannot stat", file);
  if (fstatfs(fd, &fs) < 0) return fail("cannot stat the filesystem of", file);
  if (fs.f_type == TMPFS_MAGIC || st.st_size == 0) return 0;
  if (fallocate(fd, 0, 0, st.st_size) < 0) return fail("cannot allocate", file);
  return 0;
}

/*
 * A new `target` with `source`'s content. With `hash`, the data is read once through a mapping,
 * checksummed (as `sum` does) and written from it, and the checksum line is printed: what was
 * copied is what was checked. Without, copy_file_range copies it inside the kernel.
 */
typedef struct {
  int fd;
  const char *file;
  int result;
  pthread_t thread;
} hasher_t;

static void *hash_in_background(void *arg) {
  hasher_t *hasher = arg;
  hasher->result = sum_fd(hasher->fd, hasher->file, -1);
  return NULL;
}

static int copy_file(const char *source, const char *target, int reserve, int hash, int nosync, int into) {
  int in = open(source, O_RDONLY | O_CLOEXEC);
  if (in < 0) return fail("cannot open", source);
  /* `into`: the file is there already, maybe mapped by a QEMU that has not run the guest yet
   * (its size is set to the source's below, as QEMU sets it: either order gives that size). */
  int out = into ? open(target, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC) : open(target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (out < 0) { int r = fail(into ? "cannot open" : "cannot create", target); close(in); return r; }
  struct stat st;
  int r = 0;
  ranges_t ranges = {0};
  if (fstat(in, &st) < 0) { r = fail("cannot stat", source); goto done; }
  if (ioctl(out, FICLONE, in) == 0) { /* a reflink: no data copied at all */
    if (hash) r = sum_fd(in, source, -1);
    goto done;
  }
  if (ftruncate(out, st.st_size) < 0) { r = fail("cannot size", target); goto done; }
  /* With `hash`, the checksum is taken on other threads while this one copies inside the kernel
   * (measured: writing from several threads into one file is slower than copy_file_range). */
  hasher_t hasher = { .fd = in, .file = source };
  int hashing = hash && pthread_create(&hasher.thread, NULL, hash_in_background, &hasher) == 0;
  if (hash && !hashing) { r = sum_fd(in, source, -1); if (r) goto done; }
  if (ranges_init(&ranges, in, (uint64_t)st.st_size) < 0) { r = fail("out of memory for", source); goto joined; }
  if (nosync) ranges.mode = 2;
  uint64_t start, end;
  int got_range, use_read = 0;
  static uint8_t buffer[1u << 20];
  while ((got_range = ranges_next(&ranges, &start, &end)) == 1) {
    loff_t from = (loff_t)start, to = (loff_t)start;
    while ((uint64_t)from < end) {
      ssize_t n = use_read ? -1 : copy_file_range(in, &from, out, &to, end - (uint64_t)from, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && !use_read && (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOSYS)) use_read = 1;
      if (use_read) { /* another filesystem: through a buffer */
        size_t want = end - (uint64_t)from < (1u << 20) ? (size_t)(end - (uint64_t)from) : (1u << 20);
        n = pread(in, buffer, want, from);
        if (n > 0 && pwrite(out, buffer, (size_t)n, from) != n) n = -1;
        if (n > 0) { from += n; to += n; }
      }
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) { if (n == 0) errno = EIO; r = fail("cannot copy into", target); goto joined; }
    }
  }
  if (got_range < 0) r = fail("cannot find the data of", source);
joined:
  if (hashing) {
    pthread_join(hasher.thread, NULL);
    if (r == 0) r = hasher.result;
  }
done:
  free(ranges.map);
  if (r == 0 && reserve) r = reserve_fd(out, target);
  close(in);
  if (close(out) < 0 && r == 0) r = fail("cannot write", target);
  if (r && !into) unlink(target);
  return r;
}

static int alloc_file(const char *file) {
  int fd = open(file, O_RDWR | O_CLOEXEC);
  if (fd < 0) return fail("cannot open", file);
  int r = reserve_fd(fd, file);
  close(fd);
  return r;
}

static int trim_file(const char *file) {
  int fd = open(file, O_RDWR | O_CLOEXEC);
  if (fd < 0) return fail("cannot open", file);
  struct stat st;
  if (fstat(fd, &st) < 0) { int r = fail("cannot stat", file); close(fd); return r; }
  /* Written pages must reach their extents first: an unwritten extent may still have dirty
   * pages in the page cache, and punching it would drop them. */
  if (fdatasync(fd) < 0) { int r = fail("cannot sync", file); close(fd); return r; }
  enum { N = 256 };
  struct fiemap *map = calloc(1, sizeof(struct fiemap) + N * sizeof(struct fiemap_extent));
  if (!map) { close(fd); return fail("out of memory for", file); }
  uint64_t at = 0, trimmed = 0;
  for (int last = 0; !last && at < (uint64_t)st.st_size;) {
    memset(map, 0, sizeof(struct fiemap));
    map->fm_start = at;
    map->fm_length = (uint64_t)st.st_size - at;
    map->fm_flags = FIEMAP_FLAG_SYNC;
    map->fm_extent_count = N;
    if (ioctl(fd, FS_IOC_FIEMAP, map) < 0) {
      if (errno == EOPNOTSUPP || errno == ENOTTY) break; /* no extent map (tmpfs): nothing to trim */
      int r = fail("cannot map extents of", file); free(map); close(fd); return r;
    }
    if (map->fm_mapped_extents == 0) break;
    for (unsigned i = 0; i < map->fm_mapped_extents; i++) {
      struct fiemap_extent *e = &map->fm_extents[i];
      if (e->fe_flags & FIEMAP_EXTENT_LAST) last = 1;
      at = e->fe_logical + e->fe_length;
      if (!(e->fe_flags & FIEMAP_EXTENT_UNWRITTEN)) continue;
      uint64_t end = at < (uint64_t)st.st_size ? at : (uint64_t)st.st_size;
      if (end <= e->fe_logical) continue;
      if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)e->fe_logical, (off_t)(end - e->fe_logical)) < 0) {
        int r = fail("cannot punch", file); free(map); close(fd); return r;
      }
      trimmed += end - e->fe_logical;
    }
  }
  free(map);
  close(fd);
  printf("%llu\n", (unsigned long long)trimmed);
  return 0;
}

/* ---- memory diffs (docs/vmm.md "Memory diffs") ---- */

/* How a held run says it is ready: "ready" on stdout, or, in a job of `serve`, its own line. */
static int (*ready_hook)(void) = NULL;
static int announce_ready(void) {
  if (ready_hook) return ready_hook();
  return printf("ready\n") < 0 || fflush(stdout) != 0 ? -1 : 0;
}

static const char DIFF_MAGIC[8] = {'C', 'O', 'C', 'O', 'O', 'N', 'M', 'D'};
enum { DIFF_VERSION = 1, DIFF_INVALID = 3 };

static uint64_t get_le64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | p[i]; return v; }
static uint64_t align_page(uint64_t n) { return (n + PAGE - 1) & ~(uint64_t)(PAGE - 1); }

/* Marks in `candidate` (|= mark) every page of the file's data ranges. */
static int mark_ranges(int fd, uint64_t size, uint8_t *candidate, int nosync, uint8_t mark) {
  range_t *ranges = NULL;
  size_t count = 0;
  if (collect_ranges_mode(fd, size, &ranges, &count, nosync) < 0) return -1;
  for (size_t i = 0; i < count; i++)
    for (uint64_t at = ranges[i].start; at < ranges[i].end; at += PAGE) candidate[at / PAGE] |= mark;
  free(ranges);
  return 0;
}

/*
 * Which pages of a paused VM's RAM file may hold anything but zeros, narrower than SEEK_DATA
 * (issue 12: the suspend's compare). SEEK_DATA reports every cached page over an unwritten
 * extent as data, and a RAM file is reserved (all unwritten) and full of such pages that the
 * guest only read: zeros, about as many as the image has data pages. A page over an unwritten
 * extent or a hole holds zeros unless it was written since; a written page is dirty (a write
 * fault of a shared mapping dirties it before the write) until writeback, which converts its
 * extent to written (ext4: before the page's writeback ends). So, in this order:
 *   1. FIEMAP, not synced: the ranges that are unwritten extents or holes now;
 *   2. cachestat(2): in those ranges, the pages dirty or under writeback (found by halving the
 *      ranges down to NARROW_PAGES);
 *   3. FIEMAP again: every extent that is not unwritten (written, or delayed allocation).
 * A page written before step 2 is dirty or under writeback there, or its extent is written by
 * step 3 (a conversion is never undone); the vCPUs are stopped, so nothing writes after.
 * Answers 1 when the filesystem or kernel lacks FIEMAP or cachestat (the caller then uses
 * SEEK_DATA), -1 on an error.
 */
#ifndef SYS_cachestat
#define SYS_cachestat 451
#endif
typedef struct { uint64_t off, len; } cachestat_range_t;
typedef struct { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; } cachestat_t;
enum { NARROW_PAGES = 32 };

/* Marks (|= mark) the pages of [start, end) that are dirty or under writeback, NARROW_PAGES at a time. */
static int mark_unclean(int fd, uint64_t start, uint64_t end, uint8_t *candidate, uint8_t mark) {
  if (start >= end) return 0; /* (a length of 0 would mean "to the end of the file") */
  cachestat_range_t range = {start, end - start};
  cachestat_t stat;
  if (syscall(SYS_cachestat, fd, &range, &stat, 0) < 0) return -1;
  if (stat.nr_dirty + stat.nr_writeback == 0) return 0;
  if (end - start <= (uint64_t)NARROW_PAGES * PAGE) {
    for (uint64_t at = start; at < end; at += PAGE) candidate[at / PAGE] |= mark;
    return 0;
  }
  const uint64_t mid = start + ((end - start) / 2 & ~(uint64_t)(PAGE - 1));
  return mark_unclean(fd, start, mid, candidate, mark) < 0 ? -1 : mark_unclean(fd, mid, end, candidate, mark);
}

/* The extents of a file as FIEMAP reports them now (no sync), page-aligned outwards. */
typedef struct { uint64_t start, end; int unwritten; } extent_t;
static int collect_extents(int fd, uint64_t size, extent_t **out, size_t *count) {
  struct fiemap *map = calloc(1, sizeof(struct fiemap) + MAP_EXTENTS * sizeof(struct fiemap_extent));
  size_t n = 0, capacity = 64;
  extent_t *list = malloc(capacity * sizeof *list);
  if (!map || !list) { free(map); free(list); errno = ENOMEM; return -1; }
  uint64_t next = 0;
  for (int last = 0; !last && next < size;) {
    memset(map, 0, sizeof(struct fiemap));
    map->fm_start = next;
    map->fm_length = size - next;
    map->fm_extent_count = MAP_EXTENTS;
    if (ioctl(fd, FS_IOC_FIEMAP, map) < 0) { free(map); free(list); return -1; }
    if (map->fm_mapped_extents == 0) break;
    for (unsigned i = 0; i < map->fm_mapped_extents; i++) {
      const struct fiemap_extent *e = &map->fm_extents[i];
      if (e->fe_flags & FIEMAP_EXTENT_LAST) last = 1;
      uint64_t from = e->fe_logical & ~(uint64_t)(PAGE - 1), to = align_page(e->fe_logical + e->fe_length);
      if (to > size) to = size;
      if (to > next) next = to;
      if (from >= to) continue;
      if (n == capacity) {
        extent_t *bigger = realloc(list, (capacity *= 2) * sizeof *list);
        if (!bigger) { free(map); free(list); errno = ENOMEM; return -1; }
        list = bigger;
      }
      list[n++] = (extent_t){from, to, (e->fe_flags & FIEMAP_EXTENT_UNWRITTEN) != 0};
    }
  }
  free(map);
  *out = list;
  *count = n;
  return 0;
}

static int mark_written(int fd, uint64_t size, uint8_t *candidate, uint8_t mark) {
  extent_t *extents = NULL;
  size_t count = 0;
  if (collect_extents(fd, size, &extents, &count) < 0) return errno == EOPNOTSUPP || errno == ENOTTY || errno == EINVAL ? 1 : -1;
  /* 2. the dirty pages where step 1 finds no written data: unwritten extents and the holes between */
  uint64_t at = 0;
  int r = 0;
  for (size_t i = 0; r == 0 && i <= count; i++) {
    const uint64_t hole_end = i < count ? extents[i].start : size;
    if (hole_end > at) r = mark_unclean(fd, at, hole_end, candidate, mark);
    if (r == 0 && i < count && extents[i].unwritten) r = mark_unclean(fd, extents[i].start, extents[i].end, candidate, mark);
    if (i < count && extents[i].end > at) at = extents[i].end;
  }
  free(extents);
  if (r < 0) return errno == ENOSYS ? 1 : -1;
  /* 3. every extent that is written (or allocated later) by now */
  if (collect_extents(fd, size, &extents, &count) < 0) return -1;
  for (size_t i = 0; i < count; i++)
    if (!extents[i].unwritten)
      for (uint64_t p = extents[i].start; p < extents[i].end; p += PAGE) candidate[p / PAGE] |= mark;
  free(extents);
  return 0;
}

/* Reads exactly n bytes at `at` (the file is at least that long: a read past its end is an error). */
static int read_all(int fd, uint8_t *p, size_t n, uint64_t at) {
  while (n > 0) {
    ssize_t got = pread(fd, p, n, (off_t)at);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) { if (got == 0) errno = EIO; return -1; }
    p += got; n -= (size_t)got; at += (uint64_t)got;
  }
  return 0;
}

static int write_all(int fd, const uint8_t *p, size_t n, uint64_t at) {
  while (n > 0) {
    ssize_t w = pwrite(fd, p, n, (off_t)at);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) { if (w == 0) errno = EIO; return -1; }
    p += w; n -= (size_t)w; at += (uint64_t)w;
  }
  return 0;
}

/* One thread's share of a diff's comparison: runs of candidate pages taken in turn. */
typedef struct {
  int base, mem;
  const uint8_t *candidate;
  uint8_t *bitmap;
  uint64_t pages;
  int narrow;            /* pages where BASE is a hole (candidate 2) are checked for zeros, BASE unread */
  int error;             /* errno of a failed read (the first) */
  const char *failed;    /* which file it was */
  pthread_mutex_t lock;
  uint64_t next;         /* the next page to look at */
} compare_t;

enum { BATCH = 256 }; /* pages read (and written) at once: 1 MiB */

/* Marks in the bitmap every candidate page where MEM differs from BASE (pread: measured faster
 * than faulting both files in through mappings, also with MADV_POPULATE_READ). */
static void *compare_worker(void *arg) {
  compare_t *c = arg;
  uint8_t *was = malloc((size_t)BATCH * PAGE), *now = malloc((size_t)BATCH * PAGE);
  if (!was || !now) {
    pthread_mutex_lock(&c->lock);
    if (!c->error) { c->error = ENOMEM; c->failed = "memory"; }
    pthread_mutex_unlock(&c->lock);
  }
  for (;;) {
    pthread_mutex_lock(&c->lock);
    uint64_t i = c->next;
    while (i < c->pages && !c->candidate[i]) i++;
    /* With `narrow`, a run is all pages where BASE has data, or all where it is a hole. */
    const int base_hole = c->narrow && i < c->pages && !(c->candidate[i] & 1);
    uint64_t j = i;
    while (j < c->pages && j - i < BATCH && c->candidate[j] && (!c->narrow || ((c->candidate[j] & 1) == 0) == base_hole)) j++;
    c->next = j;
    const int stop = c->error != 0;
    pthread_mutex_unlock(&c->lock);
    if (stop || i >= c->pages) break;
    const size_t bytes = (size_t)((j - i) * PAGE);
    const char *failed = NULL;
    if (base_hole) {
      if (read_all(c->mem, now, bytes, i * PAGE) < 0) failed = "mem";
      else {
        for (uint64_t k = i; k < j; k++)
          if (!all_zero(now + (k - i) * PAGE, PAGE)) __atomic_fetch_or(&c->bitmap[k / 8], (uint8_t)(1u << (k % 8)), __ATOMIC_RELAXED);
        continue;
      }
    } else if (read_all(c->base, was, bytes, i * PAGE) < 0) failed = "base";
    else if (read_all(c->mem, now, bytes, i * PAGE) < 0) failed = "mem";
    if (failed) {
      pthread_mutex_lock(&c->lock);
      if (!c->error) { c->error = errno ? errno : EIO; c->failed = failed; }
      pthread_mutex_unlock(&c->lock);
      break;
    }
    for (uint64_t k = i; k < j; k++)
      if (memcmp(now + (k - i) * PAGE, was + (k - i) * PAGE, PAGE) != 0)
        __atomic_fetch_or(&c->bitmap[k / 8], (uint8_t)(1u << (k % 8)), __ATOMIC_RELAXED);
  }
  free(was);
  free(now);
  return NULL;
}

/*
 * Only the pages in either file's data ranges are compared (a page that is a hole in both is
 * zeros in both); MEM's are found with SEEK_DATA (no writeback: a suspend's RAM file is still in
 * the page cache, or still QEMU's). A page that differs is in the diff even when it is zeros
 * (the base has data there). The comparison runs on `threads` threads; the changed pages are
 * then copied into OUT in order. With `wait`, everything that does not depend on MEM's content
 * (the files opened, BASE's data found) is done first, then "ready" is printed and the diff
 * starts on a byte on stdin: a suspend starts the helper before it pauses the VM.
 */
static int diff_file(const char *base_file, const char *mem_file, const char *out_file, int sync, int wait, int threads, int narrow) {
  int base = open(base_file, O_RDONLY | O_CLOEXEC);
  if (base < 0) return fail("cannot open", base_file);
  int mem = open(mem_file, O_RDONLY | O_CLOEXEC);
  if (mem < 0) { int r = fail("cannot open", mem_file); close(base); return r; }
  int r = 0, out = -1;
  uint8_t *candidate = NULL, *bitmap = NULL, *buffer = NULL;
  struct stat bs, ms;
  if (fstat(base, &bs) < 0) { r = fail("cannot stat", base_file); goto done; }
  if (fstat(mem, &ms) < 0) { r = fail("cannot stat", mem_file); goto done; }
  const uint64_t size = (uint64_t)ms.st_size, pages = size / PAGE;
  if ((uint64_t)bs.st_size != size || size % PAGE || size == 0) {
    fprintf(stderr, "cocoon-sparse: diff: %s is %llu bytes and %s %llu: not memory files of one size\n", mem_file,
            (unsigned long long)size, base_file, (unsigned long long)bs.st_size);
    r = DIFF_INVALID;
    goto done;
  }
  const uint64_t bitmap_bytes = (pages + 7) / 8, data_at = PAGE + align_page(bitmap_bytes);
  candidate = calloc(pages, 1);
  bitmap = calloc(1, align_page(bitmap_bytes));
  buffer = malloc((size_t)BATCH * PAGE);
  if (!candidate || !bitmap || !buffer) { r = fail("out of memory for", mem_file); goto done; }
  if (mark_ranges(base, size, candidate, 0, 1) < 0) { r = fail("cannot find the data of", base_file); goto done; }
  out = open(out_file, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (out < 0) { r = fail("cannot create", out_file); goto done; }
  if (wait) {
    char go;
    if (announce_ready() < 0) { r = 1; goto done; }
    if (read(0, &go, 1) != 1) { fprintf(stderr, "cocoon-sparse: diff: no go on stdin\n"); r = 1; goto done; }
  }
  int marked = narrow ? mark_written(mem, size, candidate, 2) : 1;
  if (marked == 1) marked = mark_ranges(mem, size, candidate, 1, 2);
  if (marked < 0) { r = fail("cannot find the data of", mem_file); goto done; }
  compare_t c = { .base = base, .mem = mem, .candidate = candidate, .bitmap = bitmap, .pages = pages, .narrow = narrow };
  pthread_mutex_init(&c.lock, NULL);
  pthread_t ids[MAX_THREADS];
  int started = 0;
  for (int t = 1; t < threads && t < MAX_THREADS; t++) if (pthread_create(&ids[started], NULL, compare_worker, &c) == 0) started++;
  compare_worker(&c);
  for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
  pthread_mutex_destroy(&c.lock);
  if (c.error) { errno = c.error; r = fail("cannot read", c.failed && strcmp(c.failed, "base") == 0 ? base_file : mem_file); goto done; }
  /* The changed pages, in order, packed after the header and bitmap. */
  uint64_t n = 0;
  for (uint64_t i = 0; i < pages;) {
    if (!(bitmap[i / 8] >> (i % 8) & 1)) { i++; continue; }
    uint64_t j = i;
    while (j < pages && j - i < BATCH && (bitmap[j / 8] >> (j % 8) & 1)) j++;
    const size_t bytes = (size_t)((j - i) * PAGE);
    if (read_all(mem, buffer, bytes, i * PAGE) < 0) { r = fail("cannot read", mem_file); goto done; }
    if (write_all(out, buffer, bytes, data_at + n * PAGE) < 0) { r = fail("cannot write", out_file); goto done; }
    n += j - i;
    i = j;
  }
  uint8_t header[PAGE];
  memset(header, 0, PAGE);
  memcpy(header, DIFF_MAGIC, 8);
  header[8] = DIFF_VERSION;                 /* u32 version, little-endian */
  header[12] = PAGE & 0xff; header[13] = PAGE >> 8; /* u32 page size */
  put_le64(header + 16, size);
  put_le64(header + 24, n);
  put_le64(header + 32, bitmap_bytes);
  if (write_all(out, header, PAGE, 0) < 0 || write_all(out, bitmap, align_page(bitmap_bytes), PAGE) < 0) { r = fail("cannot write", out_file); goto done; }
  if (ftruncate(out, (off_t)(data_at + n * PAGE)) < 0) { r = fail("cannot size", out_file); goto done; }
  /* The checksum is taken from the page cache while the data is written back (both only read it). */
  hasher_t hasher = { .fd = out, .file = out_file };
  int hashing = pthread_create(&hasher.thread, NULL, hash_in_background, &hasher) == 0;
  if (sync && fdatasync(out) < 0) r = fail("cannot sync", out_file);
  if (hashing) { pthread_join(hasher.thread, NULL); if (r == 0) r = hasher.result; }
  else if (r == 0) r = sum_fd(out, out_file, -1);
  if (r == 0) printf("%llu %llu\n", (unsigned long long)n, (unsigned long long)pages);
done:
  free(candidate);
  free(bitmap);
  free(buffer);
  close(base);
  close(mem);
  if (out >= 0 && close(out) < 0 && r == 0) r = fail("cannot write", out_file);
  if (r && out >= 0) unlink(out_file);
  return r;
}

static int invalid_diff(const char *file, const char *why) {
  fprintf(stderr, "cocoon-sparse: %s is not a valid memory diff: %s\n", file, why);
  return DIFF_INVALID;
}

static int undiff_file(const char *base_file, const char *diff_file_, const char *target, int reserve, int sumbase, int sum, int into, int onbase) {
  int fd = open(diff_file_, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail("cannot open", diff_file_);
  struct stat ds, bs;
  int r = 0, out = -1;
  const uint8_t *map = MAP_FAILED;
  if (fstat(fd, &ds) < 0) { r = fail("cannot stat", diff_file_); goto done; }
  if (stat(base_file, &bs) < 0) { r = fail("cannot stat", base_file); goto done; }
  if ((uint64_t)ds.st_size < 2 * PAGE) { r = invalid_diff(diff_file_, "too short"); goto done; }
  map = mmap(NULL, (size_t)ds.st_size, PROT_READ, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) { r = fail("cannot map", diff_file_); goto done; }
  const uint64_t size = get_le64(map + 16), n = get_le64(map + 24), bitmap_bytes = get_le64(map + 32);
  const uint64_t pages = size / PAGE;
  if (memcmp(map, DIFF_MAGIC, 8) != 0) { r = invalid_diff(diff_file_, "no magic"); goto done; }
  if (get_le64(map + 8) != ((uint64_t)PAGE << 32 | DIFF_VERSION)) { r = invalid_diff(diff_file_, "unknown version or page size"); goto done; }
  if (size != (uint64_t)bs.st_size || size % PAGE || size == 0) { r = invalid_diff(diff_file_, "its memory size is not the base's"); goto done; }
  if (bitmap_bytes != (pages + 7) / 8 || n > pages) { r = invalid_diff(diff_file_, "bad bitmap or page count"); goto done; }
  const uint64_t data_at = PAGE + align_page(bitmap_bytes);
  if ((uint64_t)ds.st_size != data_at + n * PAGE) { r = invalid_diff(diff_file_, "its size does not match its header"); goto done; }
  const uint8_t *bitmap = map + PAGE;
  uint64_t set = 0;
  for (uint64_t b = 0; b < bitmap_bytes; b++) set += (uint64_t)__builtin_popcount(bitmap[b]);
  if (set != n || (pages % 8 && bitmap[bitmap_bytes - 1] >> (pages % 8))) { r = invalid_diff(diff_file_, "its bitmap does not match its page count"); goto done; }
  /* The base's data first (checksummed as it is copied with `sumbase`), then the diff's sum, taken
   * from the mapping its pages are then written from. */
  if (!onbase) {
    r = copy_file(base_file, target, 0, sumbase, 0, into);
    if (r) goto done;
  }
  if (sum && (r = sum_fd(fd, diff_file_, -1)) != 0) { unlink(target); goto done; }
  out = open(target, O_WRONLY | O_CLOEXEC);
  if (out < 0) { r = fail("cannot open", target); unlink(target); goto done; }
  for (uint64_t i = 0, k = 0; i < pages;) {
    if (!(bitmap[i / 8] >> (i % 8) & 1)) { i++; continue; }
    uint64_t j = i;
    while (j < pages && (bitmap[j / 8] >> (j % 8) & 1)) j++;
    if (write_all(out, map + data_at + k * PAGE, (size_t)((j - i) * PAGE), i * PAGE) < 0) { r = fail("cannot write", target); break; }
    k += j - i;
    i = j;
  }
  if (r == 0 && reserve) r = reserve_fd(out, target);
  if (close(out) < 0 && r == 0) r = fail("cannot write", target);
  if (r) unlink(target);
done:
  if (map != MAP_FAILED) munmap((void *)map, (size_t)ds.st_size);
  close(fd);
  return r;
}

/* Prints the data ranges of a file (`map`). */
static int map_file(const char *file) {
  int fd = open(file, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail("cannot open", file);
  struct stat st;
  if (fstat(fd, &st) < 0) { int r = fail("cannot stat", file); close(fd); return r; }
  range_t *ranges = NULL;
  size_t count = 0;
  if (collect_ranges(fd, (uint64_t)st.st_size, &ranges, &count) < 0) { int r = fail("cannot find the data of", file); close(fd); return r; }
  close(fd);
  for (size_t i = 0; i < count; i++) printf("%llu %llu\n", (unsigned long long)ranges[i].start, (unsigned long long)ranges[i].end);
  free(ranges);
  return fflush(stdout) == 0 ? 0 : 1;
}

/* `diff BASE MEM OUT [options]` (argv[1] is "diff"). */
static int diff_main(int argc, char **argv) {
  int sync = 0, wait = 0, threads = 1, narrow = 0;
  for (int i = 5; i < argc; i++) {
    if (strcmp(argv[i], "sync") == 0) sync = 1;
    else if (strcmp(argv[i], "wait") == 0) wait = 1;
    else if (strcmp(argv[i], "narrow") == 0) narrow = 1;
    else if (strncmp(argv[i], "threads=", 8) == 0 && atoi(argv[i] + 8) >= 1) threads = atoi(argv[i] + 8);
    else { fprintf(stderr, "cocoon-sparse: unknown diff option %s\n", argv[i]); return 2; }
  }
  int r = diff_file(argv[2], argv[3], argv[4], sync, wait, threads, narrow);
  return r ? r : (fflush(stdout) == 0 ? 0 : 1);
}

/*
 * `sumheld FILE [sync]`: FILE opened at once, then "ready", then on a byte on stdin its checksum
 * line (as `sum`) and, with `sync`, its fdatasync; exit status 5 when that fdatasync fails (the
 * caller must not retry it). A suspend checksums its disk layer so, held like its diff.
 */
static int sumheld_main(int argc, char **argv) {
  if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "sync") != 0)) { fprintf(stderr, "cocoon-sparse: sumheld FILE [sync]\n"); return 2; }
  int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail("cannot open", argv[2]);
  char go;
  int r = 0;
  if (announce_ready() < 0) r = 1;
  else if (read(0, &go, 1) != 1) { fprintf(stderr, "cocoon-sparse: sumheld: no go on stdin\n"); r = 1; }
  else r = sum_fd(fd, argv[2], -1);
  if (r == 0 && argc == 4 && fdatasync(fd) < 0) { fail("cannot sync", argv[2]); r = 5; }
  close(fd);
  return r ? r : (fflush(stdout) == 0 ? 0 : 1);
}

/*
 * ---- serve: one helper for the suspends of a daemon (issue 12) ----
 *
 * Starting a helper costs a suspend ~10-20 ms on a busy 2-core host (the spawn from a large Node
 * process, exec, the dynamic loader). `serve` is started once and takes requests on stdin, one
 * per line, fields separated by tabs:
 *
 *   ID diff BASE MEM OUT [option...]   fork a job: `diff BASE MEM OUT option... wait` as above
 *   ID sumheld FILE [sync]             fork a job: `sumheld FILE [sync]` as above
 *   ID go                              the job's vCPUs are stopped: let it compare
 *   ID cancel                          end the job (SIGKILL)
 *
 * and answers one line per event, each written whole (one write of less than PIPE_BUF, so that
 * jobs' lines never interleave): "ID ready", then "ID ok LINE1<tab>LINE2" (diff's output lines)
 * or "ID fail STATUS MESSAGE" (diff's exit status and its error message). A job is a forked
 * child, so a crash in one ends neither the server nor the others. At most SERVE_JOBS run at
 * once; the server ends (and its jobs with it) when stdin closes: its daemon went away.
 */
enum { SERVE_JOBS = 64, SERVE_LINE = 16384, SERVE_ARGS = 16, SERVE_REPLY = 3072 };
typedef struct { unsigned long long id; pid_t pid; int go; } serve_job_t;
static serve_job_t jobs[SERVE_JOBS];
static int serve_out = -1;
static unsigned long long serve_id;

static void serve_reply(const char *text) {
  char line[SERVE_REPLY + 64];
  int n = snprintf(line, sizeof line, "%llu %.*s", serve_id, SERVE_REPLY, text);
  if (n < 0) return;
  if ((size_t)n > sizeof line - 2) n = (int)sizeof line - 2;
  for (int i = 0; i < n; i++) if (line[i] == '\n') line[i] = '\t';
  line[n++] = '\n';
  if (write(serve_out, line, (size_t)n) < 0) { /* the daemon is gone: nothing to tell */ }
}

static int serve_ready(void) { serve_reply("ready"); return 0; }

/* Reads a memfd's content (at most SERVE_REPLY bytes), trailing newlines cut. */
static void read_capture(int fd, char *into, size_t size) {
  ssize_t n = pread(fd, into, size - 1, 0);
  if (n < 0) n = 0;
  while (n > 0 && (into[n - 1] == '\n' || into[n - 1] == '\t')) n--;
  into[n] = 0;
}

/* The job, in the forked child: diff with stdin the go pipe, stdout and stderr captured. */
static void serve_job(int argc, char **argv, int go) {
  for (int i = 0; i < SERVE_JOBS; i++) if (jobs[i].pid > 0) close(jobs[i].go);
  signal(SIGPIPE, SIG_DFL);
  if (dup2(go, 0) < 0) _exit(1);
  close(go);
  int out = memfd_create("diff-out", MFD_CLOEXEC), err = memfd_create("diff-err", MFD_CLOEXEC);
  if (out < 0 || err < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) { serve_reply("fail 1 cannot capture the output"); _exit(1); }
  ready_hook = serve_ready;
  int r = strcmp(argv[1], "diff") == 0 ? diff_main(argc, argv) : sumheld_main(argc, argv);
  fflush(stdout);
  fflush(stderr);
  char text[SERVE_REPLY], reply[SERVE_REPLY + 32];
  read_capture(r ? err : out, text, sizeof text);
  if (r) snprintf(reply, sizeof reply, "fail %d %s", r, text[0] ? text : "cocoon-sparse diff failed");
  else snprintf(reply, sizeof reply, "ok %s", text);
  serve_reply(reply);
  _exit(r);
}

static void serve_reap(void) {
  pid_t pid;
  while ((pid = waitpid(-1, NULL, WNOHANG)) > 0)
    for (int i = 0; i < SERVE_JOBS; i++)
      if (jobs[i].pid == pid) { close(jobs[i].go); jobs[i].pid = 0; }
}

static int serve(void) {
  signal(SIGPIPE, SIG_IGN); /* a job that ended before its go: its pipe is closed */
  serve_out = dup(1);
  if (serve_out < 0) return 1;
  static char line[SERVE_LINE];
  while (fgets(line, sizeof line, stdin)) {
    size_t len = strlen(line);
    if (len == 0 || line[len - 1] != '\n') { /* too long: skip the rest, answer nothing (no id) */
      int c;
      while ((c = getchar()) != EOF && c != '\n') {}
      continue;
    }
    line[len - 1] = 0;
    serve_reap();
    char *args[SERVE_ARGS + 1];
    int argc = 0;
    for (char *save = NULL, *field = strtok_r(line, "\t", &save); field && argc < SERVE_ARGS; field = strtok_r(NULL, "\t", &save)) args[argc++] = field;
    if (argc < 2) continue;
    serve_id = strtoull(args[0], NULL, 10);
    serve_job_t *job = NULL;
    for (int i = 0; i < SERVE_JOBS && !job; i++) if (jobs[i].pid > 0 && jobs[i].id == serve_id) job = &jobs[i];
    if (strcmp(args[1], "go") == 0 || strcmp(args[1], "cancel") == 0) {
      if (!job) continue; /* ended already: its answer is on its way */
      if (args[1][0] == 'g') { if (write(job->go, "g", 1) < 0) {} }
      else kill(job->pid, SIGKILL);
      continue;
    }
    const int diff = strcmp(args[1], "diff") == 0;
    if (diff ? argc < 5 || argc > SERVE_ARGS - 1 : strcmp(args[1], "sumheld") != 0 || argc < 3 || argc > 4) { serve_reply("fail 2 unknown request"); continue; }
    for (int i = 0; i < SERVE_JOBS && !job; i++) if (jobs[i].pid == 0) job = &jobs[i];
    if (!job) { serve_reply("fail 1 too many memory diffs at once"); continue; }
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0) { serve_reply("fail 1 cannot make a pipe"); continue; }
    /* argv as `cocoon-sparse diff BASE MEM OUT option... wait` or `cocoon-sparse sumheld FILE [sync]` */
    char *argv[SERVE_ARGS + 2];
    argv[0] = "cocoon-sparse";
    for (int i = 1; i < argc; i++) argv[i] = args[i];
    int n = argc;
    if (diff) argv[n++] = "wait";
    argv[n] = NULL;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) { close(pipefd[0]); close(pipefd[1]); serve_reply("fail 1 cannot fork"); continue; }
    if (pid == 0) { close(pipefd[1]); serve_job(n, argv, pipefd[0]); }
    close(pipefd[0]);
    *job = (serve_job_t){serve_id, pid, pipefd[1]};
  }
  for (int i = 0; i < SERVE_JOBS; i++) if (jobs[i].pid > 0) kill(jobs[i].pid, SIGKILL);
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "sum") == 0) {
    for (int i = 2; i < argc; i++) {
      int r = sum_file(argv[i]);
      if (r) return r;
    }
    return fflush(stdout) == 0 ? 0 : 1;
  }
  if (argc >= 4 && strcmp(argv[1], "copy") == 0) {
    int reserve = 0, hash = 0, nosync = 0, into = 0, i = 4;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
      if (strcmp(argv[i], "reserve") == 0) reserve = 1;
      else if (strcmp(argv[i], "sum") == 0) hash = 1;
      else if (strcmp(argv[i], "nosync") == 0) nosync = 1;
      else if (strcmp(argv[i], "into") == 0) into = 1;
      else { fprintf(stderr, "cocoon-sparse: unknown copy option %s\n", argv[i]); return 2; }
    }
    int r = copy_file(argv[2], argv[3], reserve, hash, nosync, into);
    for (i++; r == 0 && i < argc; i++) r = sum_file(argv[i]); /* after `--`: more files to sum */
    return r ? r : (fflush(stdout) == 0 ? 0 : 1);
  }
  if (argc >= 4 && argc % 2 == 0 && strcmp(argv[1], "snap") == 0) {
    char go;
    if (printf("ready\n") < 0 || fflush(stdout) != 0) return 1;
    if (read(0, &go, 1) != 1) { fprintf(stderr, "cocoon-sparse: snap: no go on stdin\n"); return 1; }
    for (int i = 2; i < argc; i += 2) {
      int r = copy_file(argv[i], argv[i + 1], 0, 0, 1, 0);
      if (r) return r;
    }
    printf("done\n");
    return fflush(stdout) == 0 ? 0 : 1;
  }
  if (argc >= 5 && strcmp(argv[1], "diff") == 0) return diff_main(argc, argv);
  if (argc == 2 && strcmp(argv[1], "serve") == 0) return serve();
  if (argc >= 3 && strcmp(argv[1], "sumheld") == 0) return sumheld_main(argc, argv);
  if (argc >= 5 && strcmp(argv[1], "undiff") == 0) {
    int reserve = 0, sumbase = 0, sum = 0, into = 0, onbase = 0, i = 5;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
      if (strcmp(argv[i], "reserve") == 0) reserve = 1;
      else if (strcmp(argv[i], "into") == 0) into = 1;
      else if (strcmp(argv[i], "onbase") == 0) onbase = 1;
      else if (strcmp(argv[i], "sumbase") == 0) sumbase = 1;
      else if (strcmp(argv[i], "sum") == 0) sum = 1;
      else { fprintf(stderr, "cocoon-sparse: unknown undiff option %s\n", argv[i]); return 2; }
    }
    if (onbase && sumbase) { fprintf(stderr, "cocoon-sparse: undiff onbase copies no base to checksum\n"); return 2; }
    int r = undiff_file(argv[2], argv[3], argv[4], reserve, sumbase, sum, into, onbase);
    for (i++; r == 0 && i < argc; i++) r = sum_file(argv[i]);
    return r ? r : (fflush(stdout) == 0 ? 0 : 1);
  }
  if (argc == 3 && strcmp(argv[1], "alloc") == 0) return alloc_file(argv[2]);
  if (argc == 3 && strcmp(argv[1], "trim") == 0) return trim_file(argv[2]);
  if (argc == 3 && strcmp(argv[1], "map") == 0) return map_file(argv[2]);
  fprintf(stderr, "usage: cocoon-sparse sum FILE... | copy SRC DST [reserve] [sum] [-- FILE...] | alloc FILE | trim FILE | map FILE | diff BASE MEM OUT [sync] [wait] [narrow] [threads=N] | sumheld FILE [sync] | serve | undiff BASE DIFF TARGET [reserve] [into] [onbase] [sumbase] [sum] [-- FILE...]\n");
  return 2;
}
