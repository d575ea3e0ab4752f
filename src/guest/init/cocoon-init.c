/*
 * cocoon-init: PID 1 of every Cocoon guest.
 *
 * It mounts the early filesystems, loads the virtio modules, switches into the root disk,
 * configures the network, starts the workload described in /.cocoon/workload and then serves
 * the host's commands on the virtio-serial port "cocoon.0" (see docs/guest-protocol.md).
 *
 * Static, single-threaded, no allocations on the hot path: one poll() loop over the control
 * port and a signalfd. Built with musl (`musl-gcc -static -Os`).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#if defined(__x86_64__)
#include <sys/io.h>
#endif
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

/* From <linux/random.h>; musl ships no kernel headers and these are stable ABI. */
struct rand_pool_info {
  int entropy_count;
  int buf_size;
  uint32_t buf[];
};
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#define RNDRESEEDCRNG _IO('R', 0x07)

#define PROTOCOL_VERSION 2 /* 2: the agent port "cocoon.agent" (agent.c) */
#define MAX_LINE 4096
#define MAX_ARGS 256
#define MAX_ENV 512
#define WORKLOAD_FILE "/.cocoon/workload"
#define MODULE_DIR "/lib/modules/cocoon"
#define MAX_WAITERS 16
#define MAX_HOOKS 8

/* ---------- logging: to the console, which the host keeps in the serial log ---------- */

static void logf_(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
  buf[n++] = '\n';
  (void)!write(2, "cocoon-init: ", 13);
  (void)!write(2, buf, n);
}

static void power_off(void) {
  sync();
  reboot(RB_POWER_OFF);
  for (;;) pause();
}

static void fatal(const char *what) {
  logf_("fatal: %s: %s", what, strerror(errno));
  power_off();
}

/* ---------- kernel command line ---------- */

static char cmdline[4096];

static const char *cmdline_param(const char *name, const char *fallback) {
  size_t len = strlen(name);
  for (char *p = cmdline; (p = strstr(p, name)) != NULL; p += len) {
    if ((p == cmdline || p[-1] == ' ') && p[len] == '=') {
      static char value[256];
      const char *v = p + len + 1;
      size_t i = 0;
      while (v[i] && v[i] != ' ' && v[i] != '\n' && i < sizeof value - 1) {
        value[i] = v[i];
        i++;
      }
      value[i] = 0;
      return value;
    }
  }
  return fallback;
}

static void read_cmdline(void) {
  int fd = open("/proc/cmdline", O_RDONLY);
  if (fd < 0) return;
  ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
  if (n > 0) cmdline[n] = 0;
  close(fd);
}

/* ---------- early mounts, modules, root switch ---------- */

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags,
                         const char *data) {
  mkdir(dst, 0755);
  if (mount(src, dst, type, flags, data) != 0 && errno != EBUSY) fatal(dst);
}

static void load_modules(void) {
  int order = open(MODULE_DIR "/order", O_RDONLY);
  if (order < 0) return; /* a kernel with everything built in needs none */
  char list[2048];
  ssize_t n = read(order, list, sizeof list - 1);
  close(order);
  if (n <= 0) return;
  list[n] = 0;
  for (char *name = strtok(list, "\n"); name; name = strtok(NULL, "\n")) {
    char path[256];
    snprintf(path, sizeof path, MODULE_DIR "/%s", name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      logf_("module %s: %s", name, strerror(errno));
      continue;
    }
    if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
      logf_("module %s: %s", name, strerror(errno));
    close(fd);
  }
}

static int wait_for_path(const char *path, int timeout_ms) {
  for (int waited = 0; waited < timeout_ms; waited += 5) {
    if (access(path, F_OK) == 0) return 0;
    usleep(5000);
  }
  return -1;
}

/* Delete the initramfs' files so that their memory is returned (what switch_root does). */
static void free_initramfs(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    if (!strcmp(path, "/newroot") || !strcmp(path, "/dev") || !strcmp(path, "/proc") ||
        !strcmp(path, "/sys"))
      continue;
    if (e->d_type == DT_DIR) {
      free_initramfs(path);
      rmdir(path);
    } else {
      unlink(path);
    }
  }
  closedir(d);
}

static void switch_root(const char *device) {
  if (wait_for_path(device, 10000) != 0) {
    errno = ENODEV;
    fatal(device);
  }
  mkdir("/newroot", 0755);
  if (mount(device, "/newroot", "ext4", MS_NOATIME, NULL) != 0) fatal("mount root disk");
  free_initramfs("");
  const char *moves[] = {"/dev", "/proc", "/sys"};
  for (size_t i = 0; i < 3; i++) {
    char target[64];
    snprintf(target, sizeof target, "/newroot%s", moves[i]);
    mkdir(target, 0755);
    if (mount(moves[i], target, NULL, MS_MOVE, NULL) != 0) fatal(target);
  }
  if (chdir("/newroot") != 0) fatal("chdir /newroot");
  if (mount(".", "/", NULL, MS_MOVE, NULL) != 0) fatal("move root");
  if (chroot(".") != 0) fatal("chroot");
  if (chdir("/") != 0) fatal("chdir /");
  /* What a container expects besides the root disk. */
  mkdir("/dev/pts", 0755);
  mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666");
  mkdir("/dev/shm", 01777);
  mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mkdir("/tmp", 01777);
  mkdir("/run", 0755);
}

/* ---------- network: user-mode networking's guest address, static ---------- */

static int set_if_flags(int sock, const char *ifname, short flags) {
  struct ifreq ifr = {0};
  strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
  if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) return -1;
  ifr.ifr_flags |= flags;
  return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

static void configure_network(void) {
  int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (sock < 0) return;
  set_if_flags(sock, "lo", IFF_UP);
  if (strcmp(cmdline_param("cocoon.net", "1"), "1") != 0) {
    close(sock);
    return;
  }
  char ip[64];
  snprintf(ip, sizeof ip, "%s", cmdline_param("cocoon.ip", "10.0.2.15/24"));
  char gw[64];
  snprintf(gw, sizeof gw, "%s", cmdline_param("cocoon.gw", "10.0.2.2"));
  int prefix = 24;
  char *slash = strchr(ip, '/');
  if (slash) {
    *slash = 0;
    prefix = atoi(slash + 1);
  }
  struct ifreq ifr = {0};
  strncpy(ifr.ifr_name, "eth0", IFNAMSIZ - 1);
  struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
  sin->sin_family = AF_INET;
  if (inet_pton(AF_INET, ip, &sin->sin_addr) != 1 || ioctl(sock, SIOCSIFADDR, &ifr) != 0) {
    logf_("eth0 address %s: %s", ip, strerror(errno));
    close(sock);
    return;
  }
  sin->sin_addr.s_addr = prefix == 0 ? 0 : htonl(0xffffffffu << (32 - prefix));
  ioctl(sock, SIOCSIFNETMASK, &ifr);
  set_if_flags(sock, "eth0", IFF_UP | IFF_RUNNING);
  struct rtentry route = {0};
  struct sockaddr_in *dst = (struct sockaddr_in *)&route.rt_dst;
  struct sockaddr_in *gateway = (struct sockaddr_in *)&route.rt_gateway;
  struct sockaddr_in *mask = (struct sockaddr_in *)&route.rt_genmask;
  dst->sin_family = gateway->sin_family = mask->sin_family = AF_INET;
  inet_pton(AF_INET, gw, &gateway->sin_addr);
  route.rt_flags = RTF_UP | RTF_GATEWAY;
  if (ioctl(sock, SIOCADDRT, &route) != 0 && errno != EEXIST)
    logf_("default route via %s: %s", gw, strerror(errno));
  close(sock);
}

/* ---------- the workload file ---------- */

struct workload {
  char *argv[MAX_ARGS + 1];
  int argc;
  char *envp[MAX_ENV + 1];
  int envc;
  char *cwd;
  uid_t uid;
  gid_t gid;
  gid_t groups[64];
  int ngroups;
  char *hook_names[MAX_HOOKS];
  char *hook_cmds[MAX_HOOKS];
  int nhooks;
};

static struct workload workload;

/* Decodes the file's backslash escapes in place. */
static void unescape(char *s) {
  char *out = s;
  for (; *s; s++) {
    if (*s == '\\' && s[1]) {
      s++;
      *out++ = *s == 'n' ? '\n' : *s == 't' ? '\t' : *s;
    } else {
      *out++ = *s;
    }
  }
  *out = 0;
}

static void read_workload(void) {
  workload.cwd = "/";
  int fd = open(WORKLOAD_FILE, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size > 1024 * 1024) {
    logf_("%s: missing or larger than 1 MiB", WORKLOAD_FILE);
    close(fd);
    return;
  }
  char *text = calloc(1, st.st_size + 1);
  if (!text || read(fd, text, st.st_size) != st.st_size) {
    close(fd);
    return;
  }
  close(fd);
  for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
    if (line[0] == '#') continue;
    char *value = strchr(line, ' ');
    if (!value) continue;
    *value++ = 0;
    unescape(value);
    if (!strcmp(line, "arg") && workload.argc < MAX_ARGS) {
      workload.argv[workload.argc++] = value;
    } else if (!strcmp(line, "env") && workload.envc < MAX_ENV) {
      workload.envp[workload.envc++] = value;
    } else if (!strcmp(line, "cwd")) {
      workload.cwd = value;
    } else if (!strcmp(line, "uid")) {
      workload.uid = (uid_t)strtoul(value, NULL, 10);
    } else if (!strcmp(line, "gid")) {
      workload.gid = (gid_t)strtoul(value, NULL, 10);
    } else if (!strcmp(line, "groups")) {
      for (char *g = strtok_r(value, ",", &value); g && workload.ngroups < 64;
           g = strtok_r(NULL, ",", &value))
        workload.groups[workload.ngroups++] = (gid_t)strtoul(g, NULL, 10);
    } else if (!strncmp(line, "hook.", 5) && workload.nhooks < MAX_HOOKS) {
      workload.hook_names[workload.nhooks] = line + 5;
      workload.hook_cmds[workload.nhooks++] = value;
    }
  }
}

static int has_env(const char *name) {
  size_t len = strlen(name);
  for (int i = 0; i < workload.envc; i++)
    if (!strncmp(workload.envp[i], name, len) && workload.envp[i][len] == '=') return 1;
  return 0;
}

static sigset_t handled_signals;

/* In the child: drop to the workload's identity and exec. Never returns. */
static void exec_as_workload(char *const argv[]) {
  sigprocmask(SIG_UNBLOCK, &handled_signals, NULL);
  setsid();
  int null = open("/dev/null", O_RDONLY);
  int console = open("/dev/console", O_WRONLY | O_NOCTTY);
  if (null >= 0) dup2(null, 0);
  if (console >= 0) {
    dup2(console, 1);
    dup2(console, 2);
  }
  if (setgroups(workload.ngroups, workload.groups) != 0 || setgid(workload.gid) != 0 ||
      setuid(workload.uid) != 0) {
    logf_("cannot switch to uid %u gid %u: %s", workload.uid, workload.gid, strerror(errno));
    _exit(126);
  }
  if (chdir(workload.cwd) != 0) logf_("workdir %s: %s", workload.cwd, strerror(errno));
  environ = workload.envp;
  execvp(argv[0], argv);
  logf_("exec %s: %s", argv[0], strerror(errno));
  _exit(127);
}

/* ---------- the control port ---------- */

static int control_fd = -1;
static char outbox[64 * 1024];
static size_t outbox_len;
static int host_gone; /* poll said POLLHUP: the host side is not connected (yet) */

static int find_control_port(char *dev, size_t size) {
  DIR *d = opendir("/sys/class/virtio-ports");
  if (!d) return -1;
  struct dirent *e;
  int found = -1;
  while (found < 0 && (e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    char path[300], name[64] = {0};
    snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
    int fd = open(path, O_RDONLY);
    if (fd < 0) continue;
    ssize_t n = read(fd, name, sizeof name - 1);
    close(fd);
    if (n > 0 && !strncmp(name, "cocoon.0", 8)) {
      snprintf(dev, size, "/dev/%s", e->d_name);
      found = 0;
    }
  }
  closedir(d);
  return found;
}

static void open_control_port(void) {
  char dev[300];
  for (int waited = 0; waited < 5000; waited += 5) {
    if (find_control_port(dev, sizeof dev) == 0 && wait_for_path(dev, 1000) == 0) {
      control_fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC);
      if (control_fd >= 0) return;
    }
    usleep(5000);
  }
  logf_("control port cocoon.0 not found: the host cannot talk to this guest");
}

static void flush_outbox(void) {
  while (outbox_len > 0 && control_fd >= 0) {
    ssize_t n = write(control_fd, outbox, outbox_len);
    if (n <= 0) return; /* EAGAIN or host not connected: poll tells us when to retry */
    memmove(outbox, outbox + n, outbox_len - n);
    outbox_len -= n;
  }
}

static void send_line(const char *fmt, ...) {
  char line[MAX_LINE];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0 || n > (int)sizeof line - 2) return;
  line[n++] = '\n';
  if (outbox_len + n > sizeof outbox) return; /* host not reading: drop rather than block */
  memcpy(outbox + outbox_len, line, n);
  outbox_len += n;
  flush_outbox();
}

/* ---------- commands ---------- */

static int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Set the clock and reseed the kernel RNG: clones of one snapshot must diverge at once. */
static int restore_after_snapshot(const char *seconds, const char *nanos, const char *hex) {
  struct timespec now = {.tv_sec = strtoll(seconds, NULL, 10), .tv_nsec = strtol(nanos, NULL, 10)};
  if (clock_settime(CLOCK_REALTIME, &now) != 0) return -1;
  size_t len = strlen(hex) / 2;
  if (len < 32 || len > 512) {
    errno = EINVAL;
    return -1;
  }
  struct {
    struct rand_pool_info info;
    uint8_t bytes[512];
  } pool;
  for (size_t i = 0; i < len; i++) {
    int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      errno = EINVAL;
      return -1;
    }
    pool.bytes[i] = (uint8_t)(hi << 4 | lo);
  }
  pool.info.entropy_count = (int)(len * 8);
  pool.info.buf_size = (int)len;
  int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
  if (fd < 0) return -1;
  int rc = ioctl(fd, RNDADDENTROPY, &pool);
  if (rc == 0) rc = ioctl(fd, RNDRESEEDCRNG);
  close(fd);
  return rc;
}

struct port_waiter {
  char seq[32];
  int port;
  struct timespec deadline;
};
static struct port_waiter waiters[MAX_WAITERS];
static int nwaiters;

static long ms_until(const struct timespec *deadline) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (deadline->tv_sec - now.tv_sec) * 1000 + (deadline->tv_nsec - now.tv_nsec) / 1000000;
}

static int port_accepts(int port) {
  int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return 0;
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int ok = connect(s, (struct sockaddr *)&addr, sizeof addr) == 0;
  close(s);
  return ok;
}

static void check_waiters(void) {
  for (int i = 0; i < nwaiters;) {
    const char *result = port_accepts(waiters[i].port)         ? "ok"
                         : ms_until(&waiters[i].deadline) <= 0 ? "timeout"
                                                                : NULL;
    if (result) {
      send_line("port %s %d %s", waiters[i].seq, waiters[i].port, result);
      waiters[i] = waiters[--nwaiters];
    } else {
      i++;
    }
  }
}

struct running_hook {
  pid_t pid;
  char seq[32];
  char name[32];
  struct timespec deadline;
};
static struct running_hook hooks[MAX_HOOKS];
static int nrunning_hooks;

static void start_hook(const char *seq, const char *name, long timeout_ms) {
  const char *cmd = NULL;
  for (int i = 0; i < workload.nhooks; i++)
    if (!strcmp(workload.hook_names[i], name)) cmd = workload.hook_cmds[i];
  if (!cmd) {
    send_line("hook %s %s none", seq, name);
    return;
  }
  if (nrunning_hooks == MAX_HOOKS) {
    send_line("error %s too many hooks running", seq);
    return;
  }
  pid_t pid = fork();
  if (pid == 0) {
    char *argv[] = {"/bin/sh", "-c", (char *)cmd, NULL};
    exec_as_workload(argv);
  }
  if (pid < 0) {
    send_line("error %s fork failed", seq);
    return;
  }
  struct running_hook *h = &hooks[nrunning_hooks++];
  h->pid = pid;
  snprintf(h->seq, sizeof h->seq, "%s", seq);
  snprintf(h->name, sizeof h->name, "%s", name);
  clock_gettime(CLOCK_MONOTONIC, &h->deadline);
  h->deadline.tv_sec += timeout_ms / 1000;
  h->deadline.tv_nsec += (timeout_ms % 1000) * 1000000;
  if (h->deadline.tv_nsec >= 1000000000) {
    h->deadline.tv_sec++;
    h->deadline.tv_nsec -= 1000000000;
  }
}

static void check_hook_timeouts(void) {
  for (int i = 0; i < nrunning_hooks; i++)
    if (ms_until(&hooks[i].deadline) <= 0) kill(-hooks[i].pid, SIGKILL);
}

static pid_t workload_pid;
static int shutting_down;
static struct timespec shutdown_deadline;

/* The workload leads its own process group, but only once its child side has run setsid(): a
 * shutdown that comes right after the fork would find no such group (ESRCH) and the signal would
 * be lost, leaving the workload to the SIGKILL at the end of the grace period. Then the process
 * itself gets it (still blocked there until it unblocks its signals, so nothing is missed). */
static void signal_workload(int sig) {
  if (workload_pid <= 0) return;
  if (kill(-workload_pid, sig) < 0 && errno == ESRCH) kill(workload_pid, sig);
}

static void begin_shutdown(long grace_ms) {
  if (shutting_down) return;
  shutting_down = 1;
  signal_workload(SIGTERM);
  clock_gettime(CLOCK_MONOTONIC, &shutdown_deadline);
  shutdown_deadline.tv_sec += grace_ms / 1000 + 1;
}

/*
 * The legacy PIT (i8254), when the kernel does not use it: a kernel with a TSC-deadline local
 * APIC timer never programs it (and the guest's 6.1 kernel does not stop it), so it stays in its
 * reset state, mode 3 with the longest count, and the VMM's emulation raises its (masked) IRQ 0
 * on every edge: ~36 host timer wakeups a second in every idle microVM, forever. Stopped the way
 * Linux's clockevent_i8253_disable does (mode 0, count 0, the mode written last). Only when no
 * clock event device of the kernel is the PIT (/proc/timer_list); under KVM the in-kernel PIT
 * is stopped alike.
 */
static void stop_unused_pit(void) {
#if defined(__x86_64__)
  int fd = open("/proc/timer_list", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  static char list[64 * 1024];
  ssize_t n, len = 0;
  while (len < (ssize_t)sizeof list - 1 && (n = read(fd, list + len, sizeof list - 1 - len)) > 0) len += n;
  close(fd);
  list[len] = 0;
  if (len <= 0 || strstr(list, "Clock Event Device: pit")) return;
  if (ioperm(0x40, 4, 1) < 0) return;
  outb(0x30, 0x43);
  outb(0, 0x40);
  outb(0, 0x40);
  outb(0x30, 0x43);
  ioperm(0x40, 4, 0);
#endif
}

static void handle_command(char *line) {
  char *words[8] = {0};
  int n = 0;
  for (char *w = strtok(line, " "); w && n < 8; w = strtok(NULL, " ")) words[n++] = w;
  if (n < 2) return;
  const char *cmd = words[0], *seq = words[1];
  if (!strcmp(cmd, "ping")) {
    send_line("pong %s", seq);
  } else if (!strcmp(cmd, "restore") && n == 5) {
    if (restore_after_snapshot(words[2], words[3], words[4]) == 0)
      send_line("restored %s", seq);
    else
      send_line("error %s restore failed: %s", seq, strerror(errno));
  } else if (!strcmp(cmd, "waitport") && n == 4 && nwaiters < MAX_WAITERS) {
    struct port_waiter *w = &waiters[nwaiters++];
    snprintf(w->seq, sizeof w->seq, "%s", seq);
    w->port = atoi(words[2]);
    long timeout = atol(words[3]);
    clock_gettime(CLOCK_MONOTONIC, &w->deadline);
    w->deadline.tv_sec += timeout / 1000;
    w->deadline.tv_nsec += (timeout % 1000) * 1000000;
    if (w->deadline.tv_nsec >= 1000000000) {
      w->deadline.tv_sec++;
      w->deadline.tv_nsec -= 1000000000;
    }
    check_waiters();
  } else if (!strcmp(cmd, "hook") && n == 4) {
    start_hook(seq, words[2], atol(words[3]));
  } else if (!strcmp(cmd, "shutdown") && n == 3) {
    begin_shutdown(atol(words[2]));
  } else {
    send_line("error %s unknown command %s", seq, cmd);
  }
}

static char inbox[MAX_LINE];
static size_t inbox_len;

static void read_commands(void) {
  for (;;) {
    ssize_t n = read(control_fd, inbox + inbox_len, sizeof inbox - inbox_len);
    if (n <= 0) return; /* EAGAIN, or 0 while the host side is disconnected */
    inbox_len += n;
    char *start = inbox, *nl;
    while ((nl = memchr(start, '\n', inbox + inbox_len - start)) != NULL) {
      *nl = 0;
      handle_command(start);
      start = nl + 1;
    }
    inbox_len -= start - inbox;
    memmove(inbox, start, inbox_len);
    if (inbox_len == sizeof inbox) inbox_len = 0; /* an overlong line: drop it */
  }
}

/* ---------- children ---------- */

static pid_t agent_pid;
static struct timespec agent_started;
static void start_agent(void);

static void reap_children(void) {
  int status;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (pid == agent_pid) {
      agent_pid = 0;
      /* exit 0: no agent port on this host. Otherwise start it again (at most once a second). */
      if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && !shutting_down) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        logf_("the guest agent ended (status %d); starting it again", code);
        if (now.tv_sec - agent_started.tv_sec < 1) usleep(1000000);
        start_agent();
      }
    }
    if (pid == workload_pid) {
      workload_pid = 0;
      send_line("exit %d", code);
      logf_("workload exited with %d", code);
      begin_shutdown(0);
    }
    for (int i = 0; i < nrunning_hooks; i++) {
      if (hooks[i].pid != pid) continue;
      if (ms_until(&hooks[i].deadline) <= 0)
        send_line("hook %s %s timeout", hooks[i].seq, hooks[i].name);
      else
        send_line("hook %s %s %d", hooks[i].seq, hooks[i].name, code);
      hooks[i] = hooks[--nrunning_hooks];
      break;
    }
  }
}

static void default_environment(void) {
  if (!has_env("PATH") && workload.envc < MAX_ENV)
    workload.envp[workload.envc++] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  if (!has_env("HOME") && workload.envc < MAX_ENV)
    workload.envp[workload.envc++] = workload.uid == 0 ? "HOME=/root" : "HOME=/";
}

/* ---------- the guest agent: a process of its own, started again should it die ---------- */

static void start_agent(void) {
  clock_gettime(CLOCK_MONOTONIC, &agent_started);
  agent_pid = fork();
  if (agent_pid == 0) {
    sigprocmask(SIG_UNBLOCK, &handled_signals, NULL);
    if (control_fd >= 0) close(control_fd);
    static struct agent_defaults defaults;
    defaults.uid = workload.uid;
    defaults.gid = workload.gid;
    defaults.groups = workload.groups;
    defaults.ngroups = workload.ngroups;
    defaults.envp = workload.envp;
    defaults.cwd = workload.cwd;
    agent_main(&defaults);
  }
  if (agent_pid < 0) {
    logf_("cannot start the guest agent: %s", strerror(errno));
    agent_pid = 0;
  }
}

static void start_workload(void) {
  if (workload.argc == 0) {
    logf_("no workload in %s; waiting for commands", WORKLOAD_FILE);
    return;
  }
  workload_pid = fork();
  if (workload_pid == 0) exec_as_workload(workload.argv);
  if (workload_pid < 0) fatal("fork workload");
  logf_("started %s (pid %d)", workload.argv[0], workload_pid);
  send_line("started %d", workload_pid);
}

int main(void) {
  if (getpid() != 1) {
    fprintf(stderr, "cocoon-init must run as PID 1\n");
    return 1;
  }
  mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  int console = open("/dev/console", O_RDWR | O_NOCTTY);
  if (console >= 0) {
    dup2(console, 0);
    dup2(console, 1);
    dup2(console, 2);
    if (console > 2) close(console);
  }
  mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  stop_unused_pit();
  read_cmdline();
  load_modules();
  if (!strcmp(cmdline_param("cocoon.probe", "0"), "1")) {
    /* The host's accelerator probe: reaching userspace is all it asks. */
    open_control_port();
    send_line("hello %d", PROTOCOL_VERSION);
    usleep(50000);
    power_off();
  }
  switch_root(cmdline_param("cocoon.root", "/dev/vda"));
  sethostname(cmdline_param("cocoon.hostname", "cocoon"),
              strlen(cmdline_param("cocoon.hostname", "cocoon")));
  configure_network();
  read_workload();
  open_control_port();

  sigemptyset(&handled_signals);
  sigaddset(&handled_signals, SIGCHLD);
  sigaddset(&handled_signals, SIGTERM);
  sigaddset(&handled_signals, SIGINT);
  sigprocmask(SIG_BLOCK, &handled_signals, NULL);
  int sfd = signalfd(-1, &handled_signals, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sfd < 0) fatal("signalfd");

  default_environment();
  start_agent();
  send_line("hello %d", PROTOCOL_VERSION);
  start_workload();

  for (;;) {
    struct pollfd fds[2] = {{.fd = sfd, .events = POLLIN}, {.fd = -1}};
    if (control_fd >= 0 && !host_gone) {
      fds[1].fd = control_fd;
      fds[1].events = POLLIN | (outbox_len ? POLLOUT : 0);
    }
    /* Port waiters and hook deadlines need a tick; a disconnected host is retried gently. */
    int timeout = (nwaiters || nrunning_hooks || host_gone || shutting_down) ? 20 : -1;
    if (host_gone) timeout = 100;
    int ready = poll(fds, 2, timeout);
    if (ready < 0 && errno != EINTR) fatal("poll");
    host_gone = 0;
    if (fds[0].revents & POLLIN) {
      struct signalfd_siginfo info;
      while (read(sfd, &info, sizeof info) == sizeof info) {
        if (info.ssi_signo == SIGCHLD) reap_children();
        else begin_shutdown(5000);
      }
    }
    if (fds[1].fd >= 0) {
      if (fds[1].revents & POLLHUP) host_gone = 1;
      if (fds[1].revents & POLLIN) read_commands();
      if (fds[1].revents & POLLOUT) flush_outbox();
    }
    if (nwaiters) check_waiters();
    if (nrunning_hooks) check_hook_timeouts();
    if (shutting_down) {
      if (workload_pid > 0 && ms_until(&shutdown_deadline) <= 0) signal_workload(SIGKILL);
      if (workload_pid == 0) {
        flush_outbox();
        logf_("powering off");
        power_off();
      }
    }
  }
}
