/*
 * cocoon-listen.so: preloaded into QEMU (LD_PRELOAD, src/vmm/native/listen-shim.ts) so that the
 * listening sockets of its user-mode network's forwarded ports queue more than one connection.
 *
 * libslirp's tcpx_listen() calls listen(s, 1): the host kernel then queues at most 2 completed
 * connections for QEMU to accept (one accept per main-loop turn). A third concurrent connect
 * overflows that queue; the kernel drops its SYN (or its handshake's last ACK) and the client
 * waits for a retransmission, 1 s or more, so the gateway had to open connections to a guest
 * port two at a time. This raises any backlog below COCOON_MIN_BACKLOG to it, and changes
 * nothing else: every socket, bind and accept stays QEMU's own.
 */
#define _GNU_SOURCE
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define COCOON_MIN_BACKLOG 256 /* listen-shim.ts SHIM_BACKLOG */

int listen(int fd, int backlog) {
  if (backlog < COCOON_MIN_BACKLOG) backlog = COCOON_MIN_BACKLOG;
  return (int)syscall(SYS_listen, fd, backlog);
}
