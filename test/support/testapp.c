/*
 * A small web app for microVM tests and benchmarks, run inside the guest next to busybox httpd
 * (static, musl). One process per connection (fork), HTTP/1.1 keep-alive.
 *
 *   GET  /                   "hello from testapp"
 *   GET  /count              a counter kept in memory (shared by all connections), advanced per request
 *   GET  /headers            the request's header lines, as received
 *   GET  /log                every request this app received: "<method> <target> <names of x-cocoon-*,
 *                            x-aws-* and cookie headers, protocols=<Sec-WebSocket-Protocol>, or ->"
 *   GET  /hooks              /tmp/hooks.log (what the image's hooks wrote)
 *   POST /upload             consumes the body (Content-Length or chunked): "<bytes> <fnv1a-64 hex>"
 *   GET  /download?bytes=N   N bytes, byte i = i % 251
 *   GET  /sleep?ms=N         answers after N ms
 *   GET  /ws                 WebSocket echo (text and binary; ping → pong; close); picks the
 *                            subprotocol "chat" when offered (else none)
 *   POST /aws/lambda-microvms/runtime/v1/<hook>
 *                            AWS-style HTTP hooks: appends "<hook> <body>" to /tmp/aws-hooks.log
 *                            (body: at most 8 KiB, "\n" and "\\" escaped) and answers as the
 *                            environment variable TESTAPP_HOOK_<HOOK> (upper case) says:
 *                            "unavailable=N" 503 for the first N calls, "status=S" answer S,
 *                            "sleep=MS" wait first; default 200
 *   GET  /aws-hooks          /tmp/aws-hooks.log
 *   POST /grow?bytes=N&seed=S appends N bytes (a multiple of 4, at most 32 MiB in all) to a buffer
 *                            kept in memory (shared by all connections): xorshift32 from seed S,
 *                            each state as 4 little-endian bytes; answers the buffer's size
 *   GET  /buffer             the buffer
 *   GET  /buffer/hash        "<bytes> <fnv1a-64 hex>" of the buffer
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX 16384
#define LOG_FILE "/tmp/requests.log"

static volatile uint64_t *counter;
#define GROWN_MAX ((uint64_t)32 << 20)
static unsigned char *grown; /* the /grow buffer, and its size */
static volatile uint64_t *grown_len;
static int fd;
static char buf[65536];
static size_t have; /* bytes in buf not yet consumed */

static int write_all(const void *data, size_t n) {
  const char *p = data;
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Reads more bytes into buf; 0 on EOF or error. */
static int fill(void) {
  if (have == sizeof buf) return 0;
  for (;;) {
    ssize_t r = read(fd, buf + have, sizeof buf - have);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return 0;
    have += (size_t)r;
    return 1;
  }
}

static void consume(size_t n) {
  memmove(buf, buf + n, have - n);
  have -= n;
}

static int respond(int status, const char *type, const char *body, size_t len, int keep) {
  char head[512];
  const char *reason = status == 200 ? "OK" : status == 404 ? "Not Found" : status == 400 ? "Bad Request" : "Error";
  int n = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s\r\n", status, reason, type,
                   len, keep ? "" : "Connection: close\r\n");
  if (write_all(head, (size_t)n) < 0) return -1;
  return len ? write_all(body, len) : 0;
}

static int respond_text(int status, const char *text, int keep) {
  return respond(status, "text/plain", text, strlen(text), keep);
}

static int respond_file(const char *path, int keep) {
  static char content[1 << 20];
  size_t len = 0;
  int f = open(path, O_RDONLY);
  if (f >= 0) {
    ssize_t r;
    while (len < sizeof content && (r = read(f, content + len, sizeof content - len)) > 0) len += (size_t)r;
    close(f);
  }
  return respond(200, "text/plain", content, len, keep);
}

static const char *header(char *head, const char *name) {
  size_t n = strlen(name);
  for (char *line = strstr(head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
    char *start = line + 2;
    if (!strncasecmp(start, name, n) && start[n] == ':') {
      start += n + 1;
      while (*start == ' ') start++;
      return start;
    }
  }
  return NULL;
}

static long header_value_len(const char *value) {
  const char *end = strstr(value, "\r\n");
  return end ? end - value : (long)strlen(value);
}

static long query_number(const char *target, const char *key) {
  const char *q = strchr(target, '?');
  if (!q) return 0;
  const char *p = strstr(q, key);
  return p ? atol(p + strlen(key)) : 0;
}

static void log_request(const char *method, const char *target, char *head) {
  char line[1024];
  int n = snprintf(line, sizeof line, "%s %s", method, target);
  int any = 0;
  for (char *l = strstr(head, "\r\n"); l && n < (int)sizeof line - 80; l = strstr(l + 2, "\r\n")) {
    char *start = l + 2;
    if (!strncasecmp(start, "sec-websocket-protocol:", 23)) {
      const char *v = start + 23;
      while (*v == ' ') v++;
      n += snprintf(line + n, sizeof line - (size_t)n, " protocols=%.*s", (int)header_value_len(v) < 200 ? (int)header_value_len(v) : 200, v);
      any = 1;
      continue;
    }
    if (!strncasecmp(start, "x-cocoon-", 9) || !strncasecmp(start, "x-aws-", 6) || !strncasecmp(start, "cookie:", 7)) {
      char *colon = strchr(start, ':');
      if (!colon) continue;
      n += snprintf(line + n, sizeof line - (size_t)n, " %.*s", (int)(colon - start), start);
      any = 1;
    }
  }
  if (!any) n += snprintf(line + n, sizeof line - (size_t)n, " -");
  line[n++] = '\n';
  int f = open(LOG_FILE, O_WRONLY | O_APPEND | O_CREAT, 0644);
  if (f >= 0) {
    (void)!write(f, line, (size_t)n);
    close(f);
  }
}

/* ---- request bodies ---- */

static uint64_t fnv = 0xcbf29ce484222325ULL;
static uint64_t body_bytes;

/* The first bytes of the current request's body (the hook route logs them). */
#define BODY_KEEP 8192
static char body_kept[BODY_KEEP];

static void hash_bytes(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (body_bytes + i < BODY_KEEP) body_kept[body_bytes + i] = p[i];
    fnv ^= (unsigned char)p[i];
    fnv *= 0x100000001b3ULL;
  }
  body_bytes += n;
}

/* Reads exactly n body bytes, hashing them; -1 on EOF. */
static int read_body(uint64_t n) {
  while (n > 0) {
    if (have == 0 && !fill()) return -1;
    size_t take = have < n ? have : (size_t)n;
    hash_bytes(buf, take);
    consume(take);
    n -= take;
  }
  return 0;
}

static int read_line(char *out, size_t max) {
  for (;;) {
    char *nl = memmem(buf, have, "\r\n", 2);
    if (nl) {
      size_t len = (size_t)(nl - buf);
      if (len >= max) return -1;
      memcpy(out, buf, len);
      out[len] = 0;
      consume(len + 2);
      return 0;
    }
    if (!fill()) return -1;
  }
}

static int read_chunked(void) {
  char line[128];
  for (;;) {
    if (read_line(line, sizeof line) < 0) return -1;
    uint64_t size = strtoull(line, NULL, 16);
    if (size == 0) {
      do {
        if (read_line(line, sizeof line) < 0) return -1;
      } while (line[0]);
      return 0;
    }
    if (read_body(size) < 0 || read_line(line, sizeof line) < 0) return -1;
  }
}

/* ---- WebSocket ---- */

static void sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
  uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
  size_t total = ((len + 8) / 64 + 1) * 64;
  unsigned char *m = calloc(1, total);
  memcpy(m, msg, len);
  m[len] = 0x80;
  uint64_t bits = (uint64_t)len * 8;
  for (int i = 0; i < 8; i++) m[total - 1 - i] = (unsigned char)(bits >> (8 * i));
  for (size_t off = 0; off < total; off += 64) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
      w[i] = (uint32_t)m[off + 4 * i] << 24 | (uint32_t)m[off + 4 * i + 1] << 16 | (uint32_t)m[off + 4 * i + 2] << 8 | m[off + 4 * i + 3];
    for (int i = 16; i < 80; i++) {
      uint32_t x = w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16];
      w[i] = x << 1 | x >> 31;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
      uint32_t f, k;
      if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
      else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
      else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
      else f = b ^ c ^ d, k = 0xCA62C1D6;
      uint32_t t = (a << 5 | a >> 27) + f + e + k + w[i];
      e = d, d = c, c = b << 30 | b >> 2, b = a, a = t;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
  }
  free(m);
  for (int i = 0; i < 5; i++)
    for (int j = 0; j < 4; j++) out[4 * i + j] = (unsigned char)(h[i] >> (24 - 8 * j));
}

static void base64(const unsigned char *in, size_t n, char *out) {
  static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  size_t o = 0;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
    out[o++] = t[v >> 18 & 63];
    out[o++] = t[v >> 12 & 63];
    out[o++] = i + 1 < n ? t[v >> 6 & 63] : '=';
    out[o++] = i + 2 < n ? t[v & 63] : '=';
  }
  out[o] = 0;
}

static int need(size_t n) {
  while (have < n)
    if (!fill()) return -1;
  return 0;
}

static int ws_send(int opcode, const unsigned char *data, uint64_t len) {
  unsigned char h[10];
  size_t hl = 2;
  h[0] = (unsigned char)(0x80 | opcode);
  if (len < 126) h[1] = (unsigned char)len;
  else if (len < 65536) h[1] = 126, h[2] = (unsigned char)(len >> 8), h[3] = (unsigned char)len, hl = 4;
  else {
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (unsigned char)(len >> (56 - 8 * i));
    hl = 10;
  }
  if (write_all(h, hl) < 0) return -1;
  return write_all(data, (size_t)len);
}

static void websocket(char *head) {
  const char *key = header(head, "Sec-WebSocket-Key");
  if (!key) {
    respond_text(400, "not a websocket request\n", 0);
    return;
  }
  char src[128], accept[64];
  unsigned char digest[20];
  int klen = (int)header_value_len(key);
  snprintf(src, sizeof src, "%.*s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", klen, key);
  sha1((unsigned char *)src, strlen(src), digest);
  base64(digest, 20, accept);
  const char *protocols = header(head, "Sec-WebSocket-Protocol");
  int chat = 0;
  if (protocols) {
    char list[1024];
    snprintf(list, sizeof list, "%.*s", (int)header_value_len(protocols), protocols);
    for (char *t = strtok(list, ", "); t; t = strtok(NULL, ", ")) chat |= !strcmp(t, "chat");
  }
  char answer[256];
  int n = snprintf(answer, sizeof answer,
                   "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n", accept,
                   chat ? "Sec-WebSocket-Protocol: chat\r\n" : "");
  if (write_all(answer, (size_t)n) < 0) return;
  static unsigned char payload[1 << 20];
  for (;;) {
    if (need(2) < 0) return;
    int opcode = buf[0] & 15;
    int masked = (unsigned char)buf[1] >> 7;
    uint64_t len = (unsigned char)buf[1] & 127;
    size_t hl = 2;
    if (len == 126) {
      if (need(4) < 0) return;
      len = (uint64_t)(unsigned char)buf[2] << 8 | (unsigned char)buf[3];
      hl = 4;
    } else if (len == 127) {
      if (need(10) < 0) return;
      len = 0;
      for (int i = 0; i < 8; i++) len = len << 8 | (unsigned char)buf[2 + i];
      hl = 10;
    }
    if (len > sizeof payload || !masked) return;
    if (need(hl + 4) < 0) return;
    unsigned char mask[4];
    memcpy(mask, buf + hl, 4);
    consume(hl + 4);
    for (uint64_t got = 0; got < len;) {
      if (have == 0 && !fill()) return;
      size_t take = have < len - got ? have : (size_t)(len - got);
      for (size_t i = 0; i < take; i++) payload[got + i] = (unsigned char)buf[i] ^ mask[(got + i) & 3];
      consume(take);
      got += take;
    }
    if (opcode == 8) {
      ws_send(8, payload, len >= 2 ? 2 : 0);
      return;
    }
    if (opcode == 9) {
      if (ws_send(10, payload, len) < 0) return;
    } else if (opcode == 1 || opcode == 2) {
      if (ws_send(opcode, payload, len) < 0) return;
    }
  }
}

/* ---- AWS-style HTTP hooks ---- */

#define HOOK_PREFIX "/aws/lambda-microvms/runtime/v1/"
#define HOOKS_LOG "/tmp/aws-hooks.log"
static volatile uint64_t *hook_calls; /* per hook name slot, shared by all connections */

static int hook(const char *name, int keep) {
  static const char *names[] = {"ready", "validate", "run", "resume", "suspend", "terminate"};
  int slot = -1;
  for (int i = 0; i < 6; i++)
    if (!strcmp(name, names[i])) slot = i;
  uint64_t call = slot < 0 ? 0 : __atomic_fetch_add(&hook_calls[slot], 1, __ATOMIC_SEQ_CST);
  char var[64], upper[32];
  size_t i = 0;
  for (; name[i] && i < sizeof upper - 1; i++) upper[i] = (char)toupper((unsigned char)name[i]);
  upper[i] = 0;
  snprintf(var, sizeof var, "TESTAPP_HOOK_%s", upper);
  const char *how = getenv(var);
  long unavailable = 0, status = 200, sleep_ms = 0;
  if (how) {
    const char *p;
    if ((p = strstr(how, "unavailable="))) unavailable = atol(p + 12);
    if ((p = strstr(how, "status="))) status = atol(p + 7);
    if ((p = strstr(how, "sleep="))) sleep_ms = atol(p + 6);
  }
  if ((long)call < unavailable) status = 503;
  static char line[BODY_KEEP * 2 + 128];
  size_t n = (size_t)snprintf(line, sizeof line, "%.32s ", name);
  size_t kept = body_bytes < BODY_KEEP ? (size_t)body_bytes : BODY_KEEP;
  for (size_t k = 0; k < kept; k++) {
    char c = body_kept[k];
    if (c == '\n') line[n++] = '\\', line[n++] = 'n';
    else if (c == '\\') line[n++] = '\\', line[n++] = '\\';
    else line[n++] = c;
  }
  line[n++] = '\n';
  if (sleep_ms > 0) {
    struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
  }
  /* Logged once the hook's work is done (after the sleep), as a real hook would finish. */
  int f = open(HOOKS_LOG, O_WRONLY | O_APPEND | O_CREAT, 0644);
  if (f >= 0) {
    (void)!write(f, line, n);
    close(f);
  }
  char text[64];
  snprintf(text, sizeof text, "%.32s: %ld\n", name, status);
  return respond((int)status, "text/plain", text, strlen(text), keep);
}

/* ---- one connection ---- */

static void serve(void) {
  for (;;) {
    char *end;
    while (!(end = memmem(buf, have, "\r\n\r\n", 4))) {
      if (have >= HEAD_MAX || !fill()) return;
    }
    size_t head_len = (size_t)(end - buf) + 4;
    char head[HEAD_MAX + 1];
    memcpy(head, buf, head_len);
    head[head_len] = 0;
    consume(head_len);
    char method[16], target[2048];
    if (sscanf(head, "%15s %2047s", method, target) != 2) return;
    log_request(method, target, head);
    const char *conn = header(head, "Connection");
    int keep = !(conn && !strncasecmp(conn, "close", 5));
    const char *cl = header(head, "Content-Length");
    const char *te = header(head, "Transfer-Encoding");
    fnv = 0xcbf29ce484222325ULL;
    body_bytes = 0;
    if (te && !strncasecmp(te, "chunked", 7)) {
      if (read_chunked() < 0) return;
    } else if (cl) {
      if (read_body(strtoull(cl, NULL, 10)) < 0) return;
    }
    char path[2048];
    snprintf(path, sizeof path, "%s", target);
    char *q = strchr(path, '?');
    if (q) *q = 0;
    char text[256];
    int r = 0;
    if (!strcmp(path, "/")) r = respond_text(200, "hello from testapp\n", keep);
    else if (!strcmp(path, "/count")) {
      snprintf(text, sizeof text, "%llu\n", (unsigned long long)__atomic_add_fetch(counter, 1, __ATOMIC_SEQ_CST));
      r = respond_text(200, text, keep);
    } else if (!strcmp(path, "/headers")) {
      char *first = strstr(head, "\r\n") + 2;
      r = respond(200, "text/plain", first, strlen(first), keep);
    } else if (!strcmp(path, "/log")) r = respond_file(LOG_FILE, keep);
    else if (!strcmp(path, "/hooks")) r = respond_file("/tmp/hooks.log", keep);
    else if (!strcmp(path, "/upload")) {
      snprintf(text, sizeof text, "%llu %016llx\n", (unsigned long long)body_bytes, (unsigned long long)fnv);
      r = respond_text(200, text, keep);
    } else if (!strcmp(path, "/download")) {
      uint64_t n = (uint64_t)query_number(target, "bytes=");
      char h[256];
      int hl = snprintf(h, sizeof h, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %llu\r\n\r\n", (unsigned long long)n);
      if (write_all(h, (size_t)hl) < 0) return;
      static unsigned char block[65536];
      for (size_t i = 0; i < sizeof block; i++) block[i] = (unsigned char)(i % 251);
      uint64_t offset = 0;
      while (offset < n) {
        size_t start = (size_t)(offset % 251);
        size_t take = sizeof block - 251 < n - offset ? sizeof block - 251 : (size_t)(n - offset);
        if (write_all(block + start, take) < 0) return;
        offset += take;
      }
    } else if (!strcmp(path, "/sleep")) {
      long ms = query_number(target, "ms=");
      struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
      nanosleep(&ts, NULL);
      r = respond_text(200, "slept\n", keep);
    } else if (!strncmp(path, HOOK_PREFIX, strlen(HOOK_PREFIX)) && !strcmp(method, "POST")) {
      r = hook(path + strlen(HOOK_PREFIX), keep);
    } else if (!strcmp(path, "/grow") && !strcmp(method, "POST")) {
      uint64_t n = (uint64_t)query_number(target, "bytes="), at = *grown_len;
      uint32_t x = (uint32_t)query_number(target, "seed=");
      if (n % 4 || n > GROWN_MAX - at || x == 0) r = respond_text(400, "bad size or seed\n", keep);
      else {
        for (uint64_t i = 0; i < n; i += 4) {
          x ^= x << 13; x ^= x >> 17; x ^= x << 5;
          memcpy(grown + at + i, &x, 4); /* x86: little-endian */
        }
        *grown_len = at + n;
        snprintf(text, sizeof text, "%llu\n", (unsigned long long)(at + n));
        r = respond_text(200, text, keep);
      }
    } else if (!strcmp(path, "/buffer")) {
      r = respond(200, "application/octet-stream", (const char *)grown, (size_t)*grown_len, keep);
    } else if (!strcmp(path, "/buffer/hash")) {
      uint64_t h = 0xcbf29ce484222325ULL;
      for (uint64_t i = 0; i < *grown_len; i++) { h ^= grown[i]; h *= 0x100000001b3ULL; }
      snprintf(text, sizeof text, "%llu %016llx\n", (unsigned long long)*grown_len, (unsigned long long)h);
      r = respond_text(200, text, keep);
    } else if (!strcmp(path, "/aws-hooks")) {
      r = respond_file(HOOKS_LOG, keep);
    } else if (!strcmp(path, "/ws")) {
      websocket(head);
      return;
    } else r = respond_text(404, "not found\n", keep);
    if (r < 0 || !keep) return;
  }
}

int main(int argc, char **argv) {
  int port = argc > 1 ? atoi(argv[1]) : 8081;
  signal(SIGCHLD, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  counter = mmap(NULL, sizeof *counter, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (counter == MAP_FAILED) return 1;
  hook_calls = mmap(NULL, 8 * sizeof *hook_calls, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (hook_calls == MAP_FAILED) return 1;
  grown_len = mmap(NULL, sizeof *grown_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  grown = mmap(NULL, GROWN_MAX, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (grown_len == MAP_FAILED || grown == MAP_FAILED) return 1;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
  if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 128) < 0) {
    perror("testapp: listen");
    return 1;
  }
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) continue;
    pid_t pid = fork();
    if (pid == 0) {
      close(s);
      fd = c;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      serve();
      _exit(0);
    }
    close(c);
  }
}
