/*
 * Drives the guest agent's frame parser (src/guest/init/agent-wire.h) from stdin for the fuzz
 * test (agent-wire.test.ts): inputs are <u32 LE length><bytes>…; for each it runs the agent's
 * read loop (resynchronise on HELLO, parse frames, parse fields of control frames) and prints
 * one line per frame: "type stream len nfields". Built with ASan/UBSan when available.
 */
#include <stdio.h>
#include <stdlib.h>
#include "../../src/guest/init/agent-wire.h"

static struct agent_fields fields;

static void run(const uint8_t *buf, size_t len) {
  int syncing = 1;
  size_t at = 0;
  for (;;) {
    if (syncing) {
      long h = wire_find_hello(buf + at, len - at);
      if (h < 0) break;
      at += h;
      syncing = 0;
    }
    struct agent_frame f;
    long used = wire_parse(buf + at, len - at, &f);
    if (used == 0) break;
    if (used < 0) {
      syncing = 1;
      at++;
      continue;
    }
    int n = -1;
    if (f.type != F_DATA && f.type != F_CREDIT) n = wire_fields(f.payload, f.len, &fields) == 0 ? fields.n : -1;
    printf("%u %u %u %d\n", f.type, f.stream, f.len, n);
    at += used;
  }
  printf("end\n");
}

int main(void) {
  uint8_t hdr[4];
  while (fread(hdr, 1, 4, stdin) == 4) {
    uint32_t len = wire_u32(hdr);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf || fread(buf, 1, len, stdin) != len) return 2;
    run(buf, len);
    free(buf);
  }
  return 0;
}
