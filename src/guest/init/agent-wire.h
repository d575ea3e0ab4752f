/*
 * The guest agent's wire format (docs/guest-protocol.md, "The agent channel"): frames of a
 * 12-byte header and a bounded payload, multiplexed by stream id. Kept free of I/O so that the
 * parser can be compiled into a host test binary and fuzzed (test/guest/agent-wire-fuzz).
 */
#ifndef COCOON_AGENT_WIRE_H
#define COCOON_AGENT_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define AGENT_VERSION 2
#define AGENT_HDR 12
#define AGENT_MAX_PAYLOAD 65536
#define AGENT_MAGIC "hello\0cocoon-agent\0"
#define AGENT_MAGIC_LEN 19
#define AGENT_MAX_FIELDS 1024

/* host → guest */
enum {
  F_HELLO = 0x01,
  F_EXEC = 0x10,
  F_ATTACH = 0x11,
  F_READ = 0x12,
  F_WRITE = 0x13,
  F_REQ = 0x14,
  F_DATA = 0x20,
  F_EOF = 0x21,
  F_SIGNAL = 0x22,
  F_RESIZE = 0x23,
  F_CREDIT = 0x30,
  F_CLOSE = 0x31,
  /* guest → host */
  F_STARTED = 0x40,
  F_OUT = 0x41,
  F_ERR = 0x42,
  F_EXIT = 0x43,
  F_RESULT = 0x44,
  F_ITEM = 0x45,
  F_ERROR = 0x46,
  F_END = 0x47,
};

struct agent_frame {
  uint8_t type;
  uint32_t stream;
  uint32_t len;
  const uint8_t *payload;
};

static inline uint32_t wire_u32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void wire_put_u32(uint8_t *p, uint32_t v) {
  p[0] = v & 0xff;
  p[1] = v >> 8 & 0xff;
  p[2] = v >> 16 & 0xff;
  p[3] = v >> 24 & 0xff;
}

static inline int wire_known_host_type(uint8_t t) {
  return t == F_HELLO || (t >= F_EXEC && t <= F_REQ) || (t >= F_DATA && t <= F_RESIZE) || t == F_CREDIT ||
         t == F_CLOSE;
}

/*
 * Parses one frame from buf[0..len). Returns the bytes it takes (> 0), 0 when more bytes are
 * needed, -1 when the header is not a valid host frame (the caller then resynchronises).
 */
static inline long wire_parse(const uint8_t *buf, size_t len, struct agent_frame *f) {
  if (len < AGENT_HDR) return 0;
  if (!wire_known_host_type(buf[0]) || buf[1] != 0 || buf[2] != 0 || buf[3] != 0) return -1;
  uint32_t plen = wire_u32(buf + 8);
  if (plen > AGENT_MAX_PAYLOAD) return -1;
  if (len < AGENT_HDR + (size_t)plen) return 0;
  f->type = buf[0];
  f->stream = wire_u32(buf + 4);
  f->len = plen;
  f->payload = buf + AGENT_HDR;
  return (long)(AGENT_HDR + plen);
}

/* Where a host HELLO frame starts in buf (its payload begins with AGENT_MAGIC), or -1. */
static inline long wire_find_hello(const uint8_t *buf, size_t len) {
  for (size_t i = AGENT_HDR; i + AGENT_MAGIC_LEN <= len; i++) {
    if (buf[i] == 'h' && !memcmp(buf + i, AGENT_MAGIC, AGENT_MAGIC_LEN) && buf[i - AGENT_HDR] == F_HELLO)
      return (long)(i - AGENT_HDR);
  }
  return -1;
}

/* A payload of `key\0value\0` pairs. Values may not contain NUL. */
struct agent_fields {
  int n;
  const char *key[AGENT_MAX_FIELDS];
  const char *val[AGENT_MAX_FIELDS];
};

/* Returns 0, or -1 when the payload is not a well-formed list of pairs. */
static inline int wire_fields(const uint8_t *p, uint32_t len, struct agent_fields *out) {
  out->n = 0;
  if (len == 0) return 0;
  if (p[len - 1] != 0) return -1;
  const char *s = (const char *)p, *end = (const char *)p + len;
  while (s < end) {
    const char *k = s;
    s += strlen(s) + 1;
    if (s >= end) return -1; /* a key without a value */
    const char *v = s;
    s += strlen(s) + 1;
    if (out->n == AGENT_MAX_FIELDS) return -1;
    out->key[out->n] = k;
    out->val[out->n] = v;
    out->n++;
  }
  return 0;
}

static inline const char *wire_field(const struct agent_fields *f, const char *key) {
  for (int i = 0; i < f->n; i++)
    if (!strcmp(f->key[i], key)) return f->val[i];
  return NULL;
}

#endif
