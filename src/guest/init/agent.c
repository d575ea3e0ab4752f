/*
 * The guest agent: runs processes, PTYs and file operations for the host over the virtio-serial
 * port "cocoon.agent" (docs/guest-protocol.md, "The agent channel").
 *
 * cocoon-init forks it once the root disk is mounted; it is the same static binary, in a
 * process of its own so that a fault here never takes PID 1 down (init starts it again).
 * Single-threaded: one poll() loop over the port, a signalfd and the processes' pipes.
 *
 * Flow control: every stream has credit in both directions. The agent reads a process's output
 * or a file only while the host has granted credit for that stream and the outbox has room, so
 * one busy stream cannot starve the others and nothing is buffered without bound on either side.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent-wire.h"
#include "agent.h"

#define MAX_STREAMS 128
#define MAX_PROCS 64
#define OUTBOX_CAP (1024 * 1024)
#define OUTBOX_LOW (256 * 1024) /* sources are read only below this mark */
#define INBOX_CAP (AGENT_HDR + AGENT_MAX_PAYLOAD + 4096)
#define STDIN_WINDOW (64 * 1024)
#define WRITE_WINDOW (4 * 1024 * 1024) /* written to the file as it comes: costs the guest no memory */
#define MAX_CREDIT (1LL << 30)
#define MAX_LIST 100000

static const struct agent_defaults *defs;
static int port = -1;
static int host_gone;
static int port_async; /* O_ASYNC set on the port: a SIGIO says the host connected */
static int syncing = 1; /* until the host's HELLO: everything else is stale */

/* ---------- outbox ---------- */

static uint8_t *outbox;
static size_t out_head, out_len;

static void outbox_reset(void) { out_head = out_len = 0; }

static int emit(uint8_t type, uint32_t stream, const void *payload, size_t len) {
  if (len > AGENT_MAX_PAYLOAD || out_len + AGENT_HDR + len > OUTBOX_CAP) return -1;
  if (out_head + out_len + AGENT_HDR + len > OUTBOX_CAP) {
    memmove(outbox, outbox + out_head, out_len);
    out_head = 0;
  }
  uint8_t *p = outbox + out_head + out_len;
  p[0] = type;
  p[1] = p[2] = p[3] = 0;
  wire_put_u32(p + 4, stream);
  wire_put_u32(p + 8, (uint32_t)len);
  if (len) memcpy(p + AGENT_HDR, payload, len);
  out_len += AGENT_HDR + len;
  return 0;
}

static void flush_outbox(void) {
  while (out_len > 0 && port >= 0) {
    ssize_t n = write(port, outbox + out_head, out_len);
    if (n <= 0) return;
    out_head += n;
    out_len -= n;
  }
  if (out_len == 0) out_head = 0;
}

/* Builds a fields payload. */
struct fb {
  char buf[8192];
  size_t len;
  int overflow;
};

static void fb_add(struct fb *b, const char *key, const char *val) {
  size_t k = strlen(key) + 1, v = strlen(val) + 1;
  if (b->len + k + v > sizeof b->buf) {
    b->overflow = 1;
    return;
  }
  memcpy(b->buf + b->len, key, k);
  memcpy(b->buf + b->len + k, val, v);
  b->len += k + v;
}

static void fb_addf(struct fb *b, const char *key, const char *fmt, ...) {
  char val[64];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(val, sizeof val, fmt, ap);
  va_end(ap);
  fb_add(b, key, val);
}

static void send_error(uint32_t stream, const char *code, const char *fmt, ...) {
  struct fb b = {.len = 0};
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fb_add(&b, "code", code);
  fb_add(&b, "message", msg);
  emit(F_ERROR, stream, b.buf, b.len);
}

static const char *errno_code(int e) {
  switch (e) {
    case ENOENT: return "file_not_found";
    case ENOTDIR: return "not_a_directory";
    case EISDIR: return "is_a_directory";
    case EEXIST: return "file_exists";
    case ENOTEMPTY: return "directory_not_empty";
    case EACCES: case EPERM: return "permission_denied";
    case ENOSPC: case EDQUOT: return "no_space";
    case ENAMETOOLONG: return "path_too_long";
    case EROFS: return "read_only";
    case EXDEV: return "cross_device";
    default: return "guest_io_error";
  }
}

static void send_errno(uint32_t stream, const char *what, int e) {
  send_error(stream, errno_code(e), "%s: %s", what, strerror(e));
}

/* ---------- processes ---------- */

struct proc {
  int used;
  pid_t pid;
  int tty;
  int in_fd, out_fd, err_fd; /* -1 when closed; a PTY's master is in_fd and out_fd */
  int exited, status, timed_out, keep;
  int has_deadline;
  struct timespec deadline;
  long long started_ms;
  uint32_t stream; /* attached output stream, 0: output is read and dropped */
  uint32_t in_stream;
  uint8_t *inbuf;
  size_t inlen;
  int in_eof;
  char cmd[2048]; /* argv, NUL-separated */
  size_t cmdlen;
};

static struct proc procs[MAX_PROCS];

enum { S_FREE, S_PROC, S_INPUT, S_READ, S_WRITE, S_LIST, S_PS, S_WATCH };

struct stream {
  uint32_t id;
  int kind;
  long long credit;
  struct proc *proc;
  int fd;
  char *path, *tmp;
  mode_t mode;
  uid_t uid;
  gid_t gid;
  DIR *dir;
  int count;
};

static struct stream streams[MAX_STREAMS];

static struct stream *find_stream(uint32_t id) {
  if (id == 0) return NULL;
  for (int i = 0; i < MAX_STREAMS; i++)
    if (streams[i].kind != S_FREE && streams[i].id == id) return &streams[i];
  return NULL;
}

static struct stream *new_stream(uint32_t id, int kind) {
  if (id == 0 || find_stream(id)) return NULL;
  for (int i = 0; i < MAX_STREAMS; i++) {
    if (streams[i].kind == S_FREE) {
      memset(&streams[i], 0, sizeof streams[i]);
      streams[i].id = id;
      streams[i].kind = kind;
      streams[i].fd = -1;
      return &streams[i];
    }
  }
  return NULL;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static void free_stream(struct stream *s) {
  if (s->proc) {
    if (s->proc->stream == s->id) s->proc->stream = 0;
    if (s->proc->in_stream == s->id) s->proc->in_stream = 0;
  }
  close_fd(&s->fd);
  if (s->tmp) unlink(s->tmp);
  free(s->path);
  free(s->tmp);
  if (s->dir) closedir(s->dir);
  memset(s, 0, sizeof *s);
  s->fd = -1;
}

static void free_proc(struct proc *p) {
  if (p->tty) {
    close_fd(&p->in_fd);
    p->out_fd = -1;
  } else {
    close_fd(&p->in_fd);
    close_fd(&p->out_fd);
  }
  close_fd(&p->err_fd);
  free(p->inbuf);
  memset(p, 0, sizeof *p);
}

static struct proc *find_proc(pid_t pid) {
  for (int i = 0; i < MAX_PROCS; i++)
    if (procs[i].used && procs[i].pid == pid) return &procs[i];
  return NULL;
}

static long long now_ms_wall(void) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static long ms_until(const struct timespec *d) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (d->tv_sec - now.tv_sec) * 1000 + (d->tv_nsec - now.tv_nsec) / 1000000;
}

/* Looks a user up in /etc/passwd by name or uid. Returns 0 when found. */
static int lookup_passwd(const char *name, long uid, uid_t *out_uid, gid_t *out_gid, char *home, size_t home_size,
                         char *shell, size_t shell_size) {
  FILE *f = fopen("/etc/passwd", "re");
  if (!f) return -1;
  char line[1024];
  int found = -1;
  while (found < 0 && fgets(line, sizeof line, f)) {
    char *fields[7] = {0};
    char *s = line;
    int n = 0;
    for (; n < 7; n++) {
      fields[n] = s;
      char *c = strchr(s, n == 6 ? '\n' : ':');
      if (!c) {
        if (n == 6) n++;
        break;
      }
      *c = 0;
      s = c + 1;
    }
    if (n < 6) continue;
    if (name ? strcmp(fields[0], name) != 0 : strtol(fields[2], NULL, 10) != uid) continue;
    *out_uid = (uid_t)strtoul(fields[2], NULL, 10);
    *out_gid = (gid_t)strtoul(fields[3], NULL, 10);
    if (home) snprintf(home, home_size, "%s", fields[5] ? fields[5] : "/");
    if (shell) snprintf(shell, shell_size, "%s", fields[6] ? fields[6] : "");
    found = 0;
  }
  fclose(f);
  return found;
}

static int supplementary_groups(const char *user, gid_t primary, gid_t *out, int max) {
  int n = 0;
  out[n++] = primary;
  FILE *f = fopen("/etc/group", "re");
  if (!f) return n;
  char line[4096];
  while (n < max && fgets(line, sizeof line, f)) {
    char *name = strtok(line, ":"), *pw = strtok(NULL, ":"), *gid = strtok(NULL, ":"), *members = strtok(NULL, "\n");
    (void)name;
    (void)pw;
    if (!gid || !members) continue;
    for (char *m = strtok(members, ","); m; m = strtok(NULL, ","))
      if (!strcmp(m, user)) {
        out[n++] = (gid_t)strtoul(gid, NULL, 10);
        break;
      }
  }
  fclose(f);
  return n;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static int env_has(char **env, int n, const char *entry) {
  size_t len = strcspn(entry, "=");
  for (int i = 0; i < n; i++)
    if (!strncmp(env[i], entry, len) && env[i][len] == '=') return i;
  return -1;
}

static void env_set(char **env, int *n, int max, char *entry) {
  int at = env_has(env, *n, entry);
  if (at >= 0) env[at] = entry;
  else if (*n < max) env[(*n)++] = entry;
}

static void start_process(uint32_t id, const struct agent_fields *f) {
  struct stream *s = new_stream(id, S_PROC);
  if (!s) {
    send_error(id, "too_many_streams", "the guest agent has no free stream (or the id is in use)");
    return;
  }
  struct proc *p = NULL;
  for (int i = 0; i < MAX_PROCS && !p; i++)
    if (!procs[i].used) p = &procs[i];
  if (!p) {
    send_error(id, "too_many_processes", "at most %d processes run through exec at once", MAX_PROCS);
    free_stream(s);
    return;
  }
  static char *argv[300];
  int argc = 0;
  const char *shell = wire_field(f, "shell");
  if (shell) {
    if (access("/bin/sh", X_OK) != 0) {
      send_error(id, "no_shell", "this image has no /bin/sh: send the command as a list of arguments");
      free_stream(s);
      return;
    }
    argv[argc++] = "/bin/sh";
    argv[argc++] = "-c";
    argv[argc++] = (char *)shell;
  }
  for (int i = 0; i < f->n && argc < 256; i++)
    if (!strcmp(f->key[i], "arg")) argv[argc++] = (char *)f->val[i];
  argv[argc] = NULL;
  if (argc == 0) {
    send_error(id, "invalid_request", "no command");
    free_stream(s);
    return;
  }
  /* identity */
  uid_t uid = defs->uid;
  gid_t gid = defs->gid;
  gid_t groups[64];
  int ngroups = 0;
  char home[512] = "", login_shell[256] = "";
  const char *user = wire_field(f, "user");
  if (user && *user) {
    char *end;
    long numeric = strtol(user, &end, 10);
    if (*end == 0 && numeric >= 0) {
      uid = (uid_t)numeric;
      gid = 0;
      if (lookup_passwd(NULL, numeric, &uid, &gid, home, sizeof home, login_shell, sizeof login_shell) != 0) home[0] = 0;
      groups[ngroups++] = gid;
    } else if (lookup_passwd(user, 0, &uid, &gid, home, sizeof home, login_shell, sizeof login_shell) == 0) {
      ngroups = supplementary_groups(user, gid, groups, 64);
    } else {
      send_error(id, "unknown_user", "no user %s in the image's /etc/passwd", user);
      free_stream(s);
      return;
    }
  } else {
    ngroups = defs->ngroups < 64 ? defs->ngroups : 64;
    memcpy(groups, defs->groups, ngroups * sizeof(gid_t));
    lookup_passwd(NULL, uid, &uid, &gid, home, sizeof home, login_shell, sizeof login_shell);
    uid = defs->uid;
    gid = defs->gid;
  }
  /* environment: the image's, then HOME/USER for the user, then the request's */
  static char *env[700];
  static char home_env[600], term_env[] = "TERM=xterm-256color";
  int envc = 0;
  for (int i = 0; defs->envp[i] && envc < 512; i++) env[envc++] = defs->envp[i];
  if (home[0]) {
    snprintf(home_env, sizeof home_env, "HOME=%s", home);
    env_set(env, &envc, 690, home_env);
  }
  int tty = wire_field(f, "tty") && !strcmp(wire_field(f, "tty"), "1");
  if (tty && env_has(env, envc, "TERM=") < 0) env_set(env, &envc, 690, term_env);
  for (int i = 0; i < f->n; i++)
    if (!strcmp(f->key[i], "env") && strchr(f->val[i], '=') && f->val[i][0] != '=') env_set(env, &envc, 690, (char *)f->val[i]);
  env[envc] = NULL;
  const char *cwd = wire_field(f, "cwd");
  if (!cwd || !*cwd) cwd = user && *user && home[0] ? home : defs->cwd;
  int want_stdin = wire_field(f, "stdin") && !strcmp(wire_field(f, "stdin"), "1");

  int in_pipe[2] = {-1, -1}, out_pipe[2] = {-1, -1}, err_pipe[2] = {-1, -1}, status_pipe[2] = {-1, -1};
  int master = -1, slave = -1;
  if (pipe2(status_pipe, O_CLOEXEC) != 0) goto fail;
  if (tty) {
    struct winsize ws = {.ws_row = 24, .ws_col = 80};
    const char *cols = wire_field(f, "cols"), *rows = wire_field(f, "rows");
    if (cols && atoi(cols) > 0 && atoi(cols) < 10000) ws.ws_col = atoi(cols);
    if (rows && atoi(rows) > 0 && atoi(rows) < 10000) ws.ws_row = atoi(rows);
    if (openpty(&master, &slave, NULL, NULL, &ws) != 0) goto fail;
    fcntl(master, F_SETFD, FD_CLOEXEC);
  } else {
    if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) goto fail;
    if (want_stdin && pipe2(in_pipe, O_CLOEXEC) != 0) goto fail;
  }
  pid_t pid = fork();
  if (pid < 0) goto fail;
  if (pid == 0) {
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    if (tty) {
      ioctl(slave, TIOCSCTTY, 0);
      dup2(slave, 0);
      dup2(slave, 1);
      dup2(slave, 2);
    } else {
      int null = open("/dev/null", O_RDWR);
      dup2(want_stdin ? in_pipe[0] : null, 0);
      dup2(out_pipe[1], 1);
      dup2(err_pipe[1], 2);
    }
    int err = 0;
    if (setgroups(ngroups, groups) != 0 || setgid(gid) != 0 || setuid(uid) != 0) err = errno;
    else if (chdir(cwd) != 0) err = errno | 0x10000;
    if (!err) {
      environ = env;
      execvp(argv[0], argv);
      err = errno | 0x20000;
    }
    (void)!write(status_pipe[1], &err, sizeof err);
    _exit(127);
  }
  close(status_pipe[1]);
  int err = 0;
  ssize_t got;
  do got = read(status_pipe[0], &err, sizeof err); while (got < 0 && errno == EINTR);
  close(status_pipe[0]);
  if (slave >= 0) close(slave);
  close_fd(&in_pipe[0]);
  close_fd(&out_pipe[1]);
  close_fd(&err_pipe[1]);
  if (got == sizeof err) {
    waitpid(pid, NULL, 0);
    int e = err & 0xffff;
    if (err & 0x20000)
      send_error(id, e == ENOENT ? "command_not_found" : "exec_failed", "cannot run %s: %s", argv[0], strerror(e));
    else if (err & 0x10000)
      send_error(id, "invalid_cwd", "cannot change to %s: %s", cwd, strerror(e));
    else
      send_error(id, "invalid_user", "cannot switch to uid %u gid %u: %s", uid, gid, strerror(e));
    if (master >= 0) close(master);
    close_fd(&in_pipe[1]);
    close_fd(&out_pipe[0]);
    close_fd(&err_pipe[0]);
    free_stream(s);
    return;
  }
  memset(p, 0, sizeof *p);
  p->used = 1;
  p->pid = pid;
  p->tty = tty;
  if (tty) {
    set_nonblock(master);
    p->in_fd = p->out_fd = master;
    p->err_fd = -1;
  } else {
    p->in_fd = in_pipe[1];
    p->out_fd = out_pipe[0];
    p->err_fd = err_pipe[0];
    set_nonblock(p->out_fd);
    set_nonblock(p->err_fd);
    if (p->in_fd >= 0) set_nonblock(p->in_fd);
  }
  p->keep = wire_field(f, "keep") && !strcmp(wire_field(f, "keep"), "1");
  p->started_ms = now_ms_wall();
  const char *timeout = wire_field(f, "timeout_ms");
  if (timeout && atol(timeout) > 0) {
    long t = atol(timeout);
    p->has_deadline = 1;
    clock_gettime(CLOCK_MONOTONIC, &p->deadline);
    p->deadline.tv_sec += t / 1000;
    p->deadline.tv_nsec += (t % 1000) * 1000000;
    if (p->deadline.tv_nsec >= 1000000000) {
      p->deadline.tv_sec++;
      p->deadline.tv_nsec -= 1000000000;
    }
  }
  for (int i = 0; i < argc && p->cmdlen < sizeof p->cmd - 1; i++) {
    size_t l = strlen(argv[i]) + 1;
    if (p->cmdlen + l > sizeof p->cmd) break;
    memcpy(p->cmd + p->cmdlen, argv[i], l);
    p->cmdlen += l;
  }
  p->stream = id;
  s->proc = p;
  struct fb b = {.len = 0};
  fb_addf(&b, "pid", "%d", pid);
  emit(F_STARTED, id, b.buf, b.len);
  if (p->in_fd >= 0) {
    p->in_stream = id;
    uint8_t c[4];
    wire_put_u32(c, STDIN_WINDOW);
    emit(F_CREDIT, id, c, 4);
  }
  return;
fail:
  send_errno(id, "cannot start the process", errno);
  for (int *fd = &in_pipe[0]; fd <= &in_pipe[1]; fd++) close_fd(fd);
  for (int *fd = &out_pipe[0]; fd <= &out_pipe[1]; fd++) close_fd(fd);
  for (int *fd = &err_pipe[0]; fd <= &err_pipe[1]; fd++) close_fd(fd);
  close_fd(&status_pipe[0]);
  close_fd(&status_pipe[1]);
  close_fd(&master);
  close_fd(&slave);
  free_stream(s);
}

static void attach(uint32_t id, const struct agent_fields *f) {
  const char *pid_s = wire_field(f, "pid");
  struct proc *p = pid_s ? find_proc(atoi(pid_s)) : NULL;
  if (!p || p->exited) {
    send_error(id, "process_not_found", "no running process %s started through exec", pid_s ? pid_s : "?");
    return;
  }
  int output = !wire_field(f, "output") || strcmp(wire_field(f, "output"), "0") != 0;
  struct stream *s = new_stream(id, output ? S_PROC : S_INPUT);
  if (!s) {
    send_error(id, "too_many_streams", "the guest agent has no free stream (or the id is in use)");
    return;
  }
  s->proc = p;
  if (output) {
    struct stream *old = find_stream(p->stream);
    if (old) {
      send_error(old->id, "detached", "another client attached to process %d", p->pid);
      free_stream(old);
    }
    p->stream = id;
  }
  struct fb b = {.len = 0};
  fb_addf(&b, "pid", "%d", p->pid);
  fb_addf(&b, "tty", "%d", p->tty);
  emit(F_STARTED, id, b.buf, b.len);
  if (p->in_fd >= 0 && !p->in_eof) {
    p->in_stream = id;
    uint8_t c[4];
    wire_put_u32(c, STDIN_WINDOW);
    emit(F_CREDIT, id, c, 4);
  }
}

static void stdin_data(struct stream *s, const uint8_t *data, uint32_t len) {
  struct proc *p = s->proc;
  if (!p || p->in_fd < 0 || p->in_eof) return; /* stdin closed: dropped */
  if (p->inlen + len > 4 * STDIN_WINDOW) {
    send_error(s->id, "protocol_error", "stdin sent beyond the granted credit");
    free_stream(s);
    return;
  }
  if (!p->inbuf) p->inbuf = malloc(4 * STDIN_WINDOW);
  if (!p->inbuf) return;
  memcpy(p->inbuf + p->inlen, data, len);
  p->inlen += len;
  p->in_stream = s->id;
}

static void close_stdin_if_done(struct proc *p) {
  if (p->in_eof && p->inlen == 0 && p->in_fd >= 0 && !p->tty) close_fd(&p->in_fd);
}

/* Writes buffered stdin into the pipe or PTY; returns the credit to the stream that sent it. */
static void pump_stdin(struct proc *p) {
  if (p->inlen == 0 || p->in_fd < 0) return;
  ssize_t n = write(p->in_fd, p->inbuf, p->inlen);
  if (n < 0) {
    if (errno == EAGAIN) return;
    p->inlen = 0; /* the reader went away: drop */
    n = 0;
  }
  memmove(p->inbuf, p->inbuf + n, p->inlen - n);
  p->inlen -= n;
  if (n > 0 && find_stream(p->in_stream)) {
    uint8_t c[4];
    wire_put_u32(c, (uint32_t)n);
    emit(F_CREDIT, p->in_stream, c, 4);
  }
  close_stdin_if_done(p);
}

static const char *file_type(mode_t m) {
  return S_ISREG(m) ? "file" : S_ISDIR(m) ? "directory" : S_ISLNK(m) ? "symlink" : "other";
}

static int add_stat(struct fb *b, const char *path, const char *name) {
  struct stat st;
  if (lstat(path, &st) != 0) return -1;
  fb_add(b, "path", path);
  fb_add(b, "name", name);
  fb_add(b, "type", file_type(st.st_mode));
  fb_addf(b, "size", "%lld", (long long)st.st_size);
  fb_addf(b, "mode", "%04o", (unsigned)(st.st_mode & 07777));
  fb_addf(b, "uid", "%u", (unsigned)st.st_uid);
  fb_addf(b, "gid", "%u", (unsigned)st.st_gid);
  fb_addf(b, "mtime", "%lld.%09ld", (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
  if (S_ISLNK(st.st_mode)) {
    char target[4097];
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n >= 0) {
      target[n] = 0;
      fb_add(b, "link", target);
    }
  }
  return 0;
}

static const char *base_name(const char *path) {
  const char *slash = strrchr(path, '/');
  return slash && slash[1] ? slash + 1 : path;
}

static int send_stat(uint32_t id, uint8_t type, const char *path) {
  struct fb b = {.len = 0};
  if (add_stat(&b, path, base_name(path)) != 0) {
    send_errno(id, path, errno);
    return -1;
  }
  emit(type, id, b.buf, b.len);
  return 0;
}

static int valid_path(uint32_t id, const char *path) {
  if (!path || path[0] != '/' || strlen(path) > 4096) {
    send_error(id, "invalid_path", "paths are absolute and at most 4096 bytes");
    return 0;
  }
  return 1;
}

static void open_read(uint32_t id, const struct agent_fields *f) {
  const char *path = wire_field(f, "path");
  if (!valid_path(id, path)) return;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    send_errno(id, path, errno);
    return;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || S_ISDIR(st.st_mode)) {
    close(fd);
    send_error(id, "is_a_directory", "%s is a directory", path);
    return;
  }
  struct stream *s = new_stream(id, S_READ);
  if (!s) {
    close(fd);
    send_error(id, "too_many_streams", "the guest agent has no free stream (or the id is in use)");
    return;
  }
  s->fd = fd;
  send_stat(id, F_RESULT, path);
}

static void open_write(uint32_t id, const struct agent_fields *f) {
  const char *path = wire_field(f, "path");
  if (!valid_path(id, path)) return;
  const char *name = base_name(path);
  if (!strcmp(name, "/") || !strcmp(name, ".") || !strcmp(name, "..")) {
    send_error(id, "invalid_path", "%s names no file", path);
    return;
  }
  struct stat st;
  if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
    send_error(id, "is_a_directory", "%s is a directory", path);
    return;
  }
  struct stream *s = new_stream(id, S_WRITE);
  if (!s) {
    send_error(id, "too_many_streams", "the guest agent has no free stream (or the id is in use)");
    return;
  }
  const char *mode = wire_field(f, "mode"), *uid = wire_field(f, "uid"), *gid = wire_field(f, "gid");
  s->mode = mode ? (mode_t)strtoul(mode, NULL, 8) & 07777 : 0644;
  s->uid = uid ? (uid_t)strtoul(uid, NULL, 10) : defs->uid;
  s->gid = gid ? (gid_t)strtoul(gid, NULL, 10) : defs->gid;
  s->path = strdup(path);
  size_t dirlen = name - path;
  s->tmp = malloc(dirlen + strlen(name) + 48);
  if (!s->path || !s->tmp) {
    send_errno(id, path, ENOMEM);
    free_stream(s);
    return;
  }
  static unsigned counter;
  sprintf(s->tmp, "%.*s.%s.cocoon-upload-%u", (int)dirlen, path, name, ++counter);
  s->fd = open(s->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (s->fd < 0) {
    int e = errno;
    free(s->tmp);
    s->tmp = NULL;
    send_errno(id, path, e);
    free_stream(s);
    return;
  }
  uint8_t c[4];
  wire_put_u32(c, WRITE_WINDOW);
  emit(F_CREDIT, id, c, 4);
}

static void write_data(struct stream *s, const uint8_t *data, uint32_t len) {
  uint32_t done = 0;
  while (done < len) {
    ssize_t n = write(s->fd, data + done, len - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      send_errno(s->id, s->path, n < 0 ? errno : ENOSPC);
      free_stream(s);
      return;
    }
    done += n;
  }
  uint8_t c[4];
  wire_put_u32(c, len);
  emit(F_CREDIT, s->id, c, 4);
}

static void write_done(struct stream *s) {
  int ok = fchmod(s->fd, s->mode) == 0;
  if (ok && fchown(s->fd, s->uid, s->gid) != 0) ok = 0;
  if (!ok || close(s->fd) != 0) {
    s->fd = -1;
    send_errno(s->id, s->path, errno);
    free_stream(s);
    return;
  }
  s->fd = -1;
  if (rename(s->tmp, s->path) != 0) {
    send_errno(s->id, s->path, errno);
    free_stream(s);
    return;
  }
  free(s->tmp);
  s->tmp = NULL;
  send_stat(s->id, F_RESULT, s->path);
  free_stream(s);
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)ftw;
  return (flag == FTW_DP ? rmdir(path) : unlink(path)) == 0 ? 0 : -1;
}

static int mkdir_parents(char *path, mode_t mode) {
  for (char *p = path + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    int rc = mkdir(path, 0755);
    *p = '/';
    if (rc != 0 && errno != EEXIST) return -1;
  }
  if (mkdir(path, mode) != 0) {
    struct stat st;
    if (errno == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return 0;
    return -1;
  }
  return 0;
}

static int signal_proc(pid_t pid, int sig) {
  if (kill(-pid, sig) == 0) return 0;
  return kill(pid, sig);
}

static void request(uint32_t id, const struct agent_fields *f) {
  const char *op = wire_field(f, "op");
  const char *path = wire_field(f, "path");
  if (!op) {
    send_error(id, "invalid_request", "no op");
  } else if (!strcmp(op, "ping")) {
    struct fb b = {.len = 0};
    fb_addf(&b, "version", "%d", AGENT_VERSION);
    emit(F_RESULT, id, b.buf, b.len);
  } else if (!strcmp(op, "stat")) {
    if (valid_path(id, path)) send_stat(id, F_RESULT, path);
  } else if (!strcmp(op, "list")) {
    if (!valid_path(id, path)) return;
    DIR *d = opendir(path);
    if (!d) {
      send_errno(id, path, errno);
      return;
    }
    struct stream *s = new_stream(id, S_LIST);
    if (!s) {
      closedir(d);
      send_error(id, "too_many_streams", "the guest agent has no free stream (or the id is in use)");
      return;
    }
    s->dir = d;
    s->path = strdup(path);
  } else if (!strcmp(op, "mkdir")) {
    if (!valid_path(id, path)) return;
    const char *mode = wire_field(f, "mode"), *parents = wire_field(f, "parents");
    mode_t m = mode ? (mode_t)strtoul(mode, NULL, 8) & 07777 : 0755;
    char copy[4097];
    snprintf(copy, sizeof copy, "%s", path);
    int rc = parents && !strcmp(parents, "1") ? mkdir_parents(copy, m) : mkdir(path, m);
    if (rc != 0) send_errno(id, path, errno);
    else {
      if (chown(path, defs->uid, defs->gid) != 0) { /* best effort: the image's user owns it */ }
      send_stat(id, F_RESULT, path);
    }
  } else if (!strcmp(op, "remove")) {
    if (!valid_path(id, path)) return;
    if (!strcmp(path, "/")) {
      send_error(id, "invalid_path", "refusing to remove /");
      return;
    }
    const char *recursive = wire_field(f, "recursive");
    struct stat st;
    int rc;
    if (lstat(path, &st) != 0) rc = -1;
    else if (S_ISDIR(st.st_mode) && recursive && !strcmp(recursive, "1"))
      rc = nftw(path, remove_entry, 32, FTW_DEPTH | FTW_PHYS);
    else
      rc = S_ISDIR(st.st_mode) ? rmdir(path) : unlink(path);
    if (rc != 0) send_errno(id, path, errno);
    else emit(F_END, id, NULL, 0);
  } else if (!strcmp(op, "rename")) {
    const char *from = wire_field(f, "from"), *to = wire_field(f, "to");
    if (!valid_path(id, from) || !valid_path(id, to)) return;
    if (rename(from, to) != 0) send_errno(id, from, errno);
    else send_stat(id, F_RESULT, to);
  } else if (!strcmp(op, "chmod")) {
    if (!valid_path(id, path)) return;
    const char *mode = wire_field(f, "mode"), *uid = wire_field(f, "uid"), *gid = wire_field(f, "gid");
    if (mode && chmod(path, (mode_t)strtoul(mode, NULL, 8) & 07777) != 0) {
      send_errno(id, path, errno);
      return;
    }
    if ((uid || gid) && lchown(path, uid ? (uid_t)strtoul(uid, NULL, 10) : (uid_t)-1, gid ? (gid_t)strtoul(gid, NULL, 10) : (gid_t)-1) != 0) {
      send_errno(id, path, errno);
      return;
    }
    send_stat(id, F_RESULT, path);
  } else if (!strcmp(op, "watch")) {
    /* Directory events as OUT frames (fields `event`, `name`), within the stream's credit. */
    if (!valid_path(id, path)) return;
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0) {
      send_errno(id, "inotify", errno);
      return;
    }
    if (inotify_add_watch(fd, path, IN_CREATE | IN_DELETE | IN_CLOSE_WRITE | IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | IN_DELETE_SELF | IN_ONLYDIR) < 0) {
      int e = errno;
      close(fd);
      send_errno(id, path, e);
      return;
    }
    struct stream *s = new_stream(id, S_WATCH);
    if (!s) {
      close(fd);
      send_error(id, "too_many_streams", "the guest agent has no free stream (or the id is in use)");
      return;
    }
    s->fd = fd;
    emit(F_STARTED, id, NULL, 0);
  } else if (!strcmp(op, "ps")) {
    struct stream *s = new_stream(id, S_PS);
    if (!s) send_error(id, "too_many_streams", "the guest agent has no free stream (or the id is in use)");
  } else if (!strcmp(op, "signal") || !strcmp(op, "resize") || !strcmp(op, "closestdin")) {
    const char *pid_s = wire_field(f, "pid");
    struct proc *p = pid_s ? find_proc(atoi(pid_s)) : NULL;
    if (!p || p->exited) {
      send_error(id, "process_not_found", "no running process %s started through exec", pid_s ? pid_s : "?");
      return;
    }
    if (!strcmp(op, "signal")) {
      const char *sig = wire_field(f, "signal");
      int n = sig ? atoi(sig) : 0;
      if (n < 1 || n > 64 || signal_proc(p->pid, n) != 0) {
        send_error(id, "invalid_signal", "cannot send signal %s", sig ? sig : "?");
        return;
      }
    } else if (!strcmp(op, "resize")) {
      const char *cols = wire_field(f, "cols"), *rows = wire_field(f, "rows");
      struct winsize ws = {.ws_col = cols ? atoi(cols) : 80, .ws_row = rows ? atoi(rows) : 24};
      if (!p->tty) {
        send_error(id, "not_a_tty", "process %d has no PTY", p->pid);
        return;
      }
      ioctl(p->in_fd, TIOCSWINSZ, &ws);
    } else {
      p->in_eof = 1;
      close_stdin_if_done(p);
    }
    emit(F_END, id, NULL, 0);
  } else {
    send_error(id, "unknown_op", "unknown op %s", op);
  }
}

/* ---------- the host's frames ---------- */

/* The host went (a suspend, a daemon restart) or greeted anew: its streams are gone. A foreground
   process whose session ended is over too, as when its client leaves; background ones run on,
   their output read and dropped. */
static void reset_streams(void) {
  for (int i = 0; i < MAX_PROCS; i++)
    if (procs[i].used && !procs[i].keep && find_stream(procs[i].stream) && !procs[i].exited) signal_proc(procs[i].pid, SIGKILL);
  for (int i = 0; i < MAX_STREAMS; i++)
    if (streams[i].kind != S_FREE) free_stream(&streams[i]);
  for (int i = 0; i < MAX_PROCS; i++) {
    procs[i].stream = procs[i].in_stream = 0;
    procs[i].inlen = 0;
  }
  outbox_reset();
}

static void handle_frame(const struct agent_frame *fr) {
  static struct agent_fields f;
  if (fr->type == F_HELLO) {
    if (wire_fields(fr->payload, fr->len, &f) != 0) return;
    reset_streams();
    struct fb b = {.len = 0};
    fb_add(&b, "hello", "cocoon-agent");
    fb_addf(&b, "version", "%d", AGENT_VERSION);
    const char *nonce = wire_field(&f, "nonce");
    fb_add(&b, "nonce", nonce ? nonce : "");
    emit(F_HELLO, 0, b.buf, b.len);
    return;
  }
  struct stream *s = find_stream(fr->stream);
  switch (fr->type) {
    case F_EXEC:
    case F_ATTACH:
    case F_READ:
    case F_WRITE:
    case F_REQ:
      if (s || fr->stream == 0) return; /* a second open on a live id: ignored */
      if (wire_fields(fr->payload, fr->len, &f) != 0) {
        send_error(fr->stream, "protocol_error", "malformed fields");
        return;
      }
      if (fr->type == F_EXEC) start_process(fr->stream, &f);
      else if (fr->type == F_ATTACH) attach(fr->stream, &f);
      else if (fr->type == F_READ) open_read(fr->stream, &f);
      else if (fr->type == F_WRITE) open_write(fr->stream, &f);
      else request(fr->stream, &f);
      return;
    case F_CREDIT:
      if (s && fr->len == 4) {
        s->credit += wire_u32(fr->payload);
        if (s->credit > MAX_CREDIT) s->credit = MAX_CREDIT;
      }
      return;
    case F_DATA:
      if (!s) return;
      if (s->kind == S_WRITE) write_data(s, fr->payload, fr->len);
      else if (s->kind == S_PROC || s->kind == S_INPUT) stdin_data(s, fr->payload, fr->len);
      return;
    case F_EOF:
      if (!s) return;
      if (s->kind == S_WRITE) write_done(s);
      else if ((s->kind == S_PROC || s->kind == S_INPUT) && s->proc) {
        s->proc->in_eof = 1;
        if (s->proc->tty && !s->proc->inbuf) s->proc->inbuf = malloc(4 * STDIN_WINDOW);
        if (s->proc->tty && s->proc->in_fd >= 0 && s->proc->inbuf && s->proc->inlen < 4 * STDIN_WINDOW) {
          s->proc->inbuf[s->proc->inlen++] = 4; /* Ctrl-D: a PTY's end of input */
        }
        close_stdin_if_done(s->proc);
      }
      return;
    case F_SIGNAL:
      if (s && s->proc && wire_fields(fr->payload, fr->len, &f) == 0 && wire_field(&f, "signal")) {
        int n = atoi(wire_field(&f, "signal"));
        if (n >= 1 && n <= 64) signal_proc(s->proc->pid, n);
      }
      return;
    case F_RESIZE:
      if (s && s->proc && s->proc->tty && wire_fields(fr->payload, fr->len, &f) == 0) {
        const char *cols = wire_field(&f, "cols"), *rows = wire_field(&f, "rows");
        struct winsize ws = {.ws_col = cols ? atoi(cols) : 80, .ws_row = rows ? atoi(rows) : 24};
        ioctl(s->proc->in_fd, TIOCSWINSZ, &ws);
      }
      return;
    case F_CLOSE:
      if (!s) return;
      /* A client that leaves its (foreground) exec wants the process gone. */
      if (s->kind == S_PROC && s->proc && !s->proc->keep && s->proc->stream == s->id && !s->proc->exited)
        signal_proc(s->proc->pid, SIGKILL);
      free_stream(s);
      return;
  }
}

static uint8_t inbox[INBOX_CAP];
static size_t inbox_len;

static void read_port(void) {
  for (;;) {
    if (out_len > OUTBOX_LOW) return; /* the host is not reading our answers: stop taking requests */
    ssize_t n = read(port, inbox + inbox_len, sizeof inbox - inbox_len);
    if (n <= 0) return;
    inbox_len += n;
    size_t at = 0;
    for (;;) {
      if (syncing) {
        long h = wire_find_hello(inbox + at, inbox_len - at);
        if (h < 0) {
          /* keep a tail that may hold the start of a HELLO */
          size_t keep = AGENT_HDR + AGENT_MAGIC_LEN;
          if (inbox_len - at > keep) at = inbox_len - keep;
          break;
        }
        at += h;
        syncing = 0;
      }
      struct agent_frame fr;
      long used = wire_parse(inbox + at, inbox_len - at, &fr);
      if (used == 0) break;
      if (used < 0) {
        syncing = 1;
        at++;
        continue;
      }
      handle_frame(&fr);
      at += used;
    }
    memmove(inbox, inbox + at, inbox_len - at);
    inbox_len -= at;
  }
}

/* ---------- sources: process output, files, listings ---------- */

static uint8_t chunk[AGENT_MAX_PAYLOAD];

/* Reads from fd into the stream (or drops it when no stream); returns 1 at EOF. */
static int pump_output(struct proc *p, int *fd, uint8_t type) {
  if (*fd < 0) return 1;
  struct stream *s = find_stream(p->stream);
  size_t want = sizeof chunk;
  if (s) {
    if (s->credit <= 0 || out_len > OUTBOX_LOW) return 0;
    if ((long long)want > s->credit) want = (size_t)s->credit;
  }
  ssize_t n = read(*fd, chunk, want);
  if (n > 0) {
    if (s) {
      emit(type, s->id, chunk, n);
      s->credit -= n;
    }
    return 0;
  }
  if (n < 0 && errno == EAGAIN) return p->exited; /* after the exit: what was written is read */
  if (p->tty) {
    p->out_fd = -1;
    return 1;
  }
  close_fd(fd);
  return 1;
}

static const char *sig_name(int sig) {
  static char buf[16];
  snprintf(buf, sizeof buf, "%d", sig);
  return buf;
}

static void finish_proc(struct proc *p) {
  struct stream *s = find_stream(p->stream);
  if (s) {
    struct fb b = {.len = 0};
    if (WIFSIGNALED(p->status)) fb_add(&b, "signal", sig_name(WTERMSIG(p->status)));
    else fb_addf(&b, "code", "%d", WEXITSTATUS(p->status));
    fb_addf(&b, "timedout", "%d", p->timed_out);
    emit(F_EXIT, s->id, b.buf, b.len);
    s->proc = NULL;
    free_stream(s);
  }
  for (int i = 0; i < MAX_STREAMS; i++)
    if (streams[i].proc == p) {
      struct fb b = {.len = 0};
      fb_add(&b, "code", "process_exited");
      fb_add(&b, "message", "the process has exited");
      emit(F_ERROR, streams[i].id, b.buf, b.len);
      streams[i].proc = NULL;
      free_stream(&streams[i]);
    }
  free_proc(p);
}

static void pump_sources(void) {
  for (int i = 0; i < MAX_PROCS; i++) {
    struct proc *p = &procs[i];
    if (!p->used) continue;
    if (p->inlen) pump_stdin(p);
    int out_done = 0, err_done = 1;
    for (int round = 0; round < 4; round++) {
      out_done = pump_output(p, &p->out_fd, F_OUT);
      err_done = p->tty ? 1 : pump_output(p, &p->err_fd, F_ERR);
    }
    if (p->exited && out_done && err_done) finish_proc(p);
  }
  for (int i = 0; i < MAX_STREAMS; i++) {
    struct stream *s = &streams[i];
    if (s->kind == S_READ) {
      while (s->credit > 0 && out_len <= OUTBOX_LOW) {
        size_t want = s->credit < (long long)sizeof chunk ? (size_t)s->credit : sizeof chunk;
        ssize_t n = read(s->fd, chunk, want);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) break;
        if (n < 0) {
          send_errno(s->id, "read", errno);
          free_stream(s);
          break;
        }
        if (n == 0) {
          emit(F_END, s->id, NULL, 0);
          free_stream(s);
          break;
        }
        emit(F_OUT, s->id, chunk, n);
        s->credit -= n;
      }
    } else if (s->kind == S_LIST) {
      struct dirent *e;
      while (out_len <= OUTBOX_LOW && (e = readdir(s->dir)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char full[8200];
        snprintf(full, sizeof full, "%s%s%s", s->path, s->path[strlen(s->path) - 1] == '/' ? "" : "/", e->d_name);
        struct fb b = {.len = 0};
        if (add_stat(&b, full, e->d_name) == 0 && !b.overflow) emit(F_ITEM, s->id, b.buf, b.len);
        if (++s->count >= MAX_LIST) break;
      }
      if (out_len <= OUTBOX_LOW) {
        emit(F_END, s->id, NULL, 0);
        free_stream(s);
      }
    } else if (s->kind == S_WATCH) {
      while (s->credit > 0 && out_len <= OUTBOX_LOW) {
        static char events[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
        ssize_t n = read(s->fd, events, sizeof events);
        if (n <= 0) break;
        int gone = 0;
        for (char *at = events; at < events + n;) {
          struct inotify_event *ev = (struct inotify_event *)at;
          at += sizeof *ev + ev->len;
          const char *what = ev->mask & IN_CREATE ? "create" : ev->mask & IN_DELETE ? "remove"
                           : ev->mask & (IN_MODIFY | IN_CLOSE_WRITE) ? "write" : ev->mask & IN_MOVED_FROM ? "rename_from"
                           : ev->mask & IN_MOVED_TO ? "rename_to" : ev->mask & IN_ATTRIB ? "chmod"
                           : ev->mask & (IN_DELETE_SELF | IN_IGNORED) ? "gone" : NULL;
          if (!what) continue;
          if (!strcmp(what, "gone")) gone = 1;
          struct fb b = {.len = 0};
          fb_add(&b, "event", what);
          fb_add(&b, "name", ev->len ? ev->name : "");
          fb_add(&b, "dir", (ev->mask & IN_ISDIR) ? "1" : "0");
          emit(F_OUT, s->id, b.buf, b.len);
          s->credit -= (long long)b.len;
        }
        if (gone) {
          emit(F_END, s->id, NULL, 0);
          free_stream(s);
          break;
        }
      }
    } else if (s->kind == S_PS) {
      for (int j = 0; j < MAX_PROCS; j++) {
        struct proc *p = &procs[j];
        if (!p->used || p->exited) continue;
        struct fb b = {.len = 0};
        fb_addf(&b, "pid", "%d", p->pid);
        fb_addf(&b, "tty", "%d", p->tty);
        fb_addf(&b, "started", "%lld", p->started_ms);
        for (size_t at = 0; at < p->cmdlen; at += strlen(p->cmd + at) + 1) fb_add(&b, "arg", p->cmd + at);
        emit(F_ITEM, s->id, b.buf, b.len);
      }
      emit(F_END, s->id, NULL, 0);
      free_stream(s);
    }
  }
}

static void reap(void) {
  int status;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    struct proc *p = find_proc(pid);
    if (!p) continue;
    p->exited = 1;
    p->status = status;
  }
}

static void check_deadlines(void) {
  for (int i = 0; i < MAX_PROCS; i++) {
    struct proc *p = &procs[i];
    if (p->used && !p->exited && p->has_deadline && !p->timed_out && ms_until(&p->deadline) <= 0) {
      p->timed_out = 1;
      signal_proc(p->pid, SIGKILL);
    }
  }
}

static int open_port(void) {
  for (int waited = 0; waited < 5000; waited += 10) {
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
      if (e->d_name[0] == '.') continue;
      char path[300], name[64] = {0};
      snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
      int fd = open(path, O_RDONLY | O_CLOEXEC);
      if (fd < 0) continue;
      ssize_t n = read(fd, name, sizeof name - 1);
      close(fd);
      if (n > 0 && !strncmp(name, "cocoon.agent", 12)) {
        snprintf(path, sizeof path, "/dev/%s", e->d_name);
        closedir(d);
        for (int w = 0; w < 1000; w += 5) {
          int port_fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
          if (port_fd >= 0) return port_fd;
          usleep(5000);
        }
        return -1;
      }
    }
    if (d) closedir(d);
    usleep(10000);
  }
  return -1;
}

/*
 * While no host is connected the port polls POLLHUP at once, so waiting for one used to be a
 * 100 ms tick: ten guest wakeups a second in every idle microVM, dozens of host wakeups in
 * its VMM (timer, kick, halt), a share of a host core per hundred idle guests. Instead the
 * port raises SIGIO (O_ASYNC, F_SETOWN) when the host connects (virtio_console sends it on
 * PORT_OPEN), which wakes the signalfd. On only while the host is away: with it on, every
 * buffer of data would raise one too. Answers whether the host is still away (looked again
 * after arming, so that a connection in between is not missed).
 */
static int await_host(void) {
  if (!port_async) {
    fcntl(port, F_SETOWN, getpid());
    fcntl(port, F_SETFL, fcntl(port, F_GETFL) | O_ASYNC);
    port_async = 1;
  }
  struct pollfd p = {.fd = port, .events = POLLIN};
  return poll(&p, 1, 0) >= 0 && (p.revents & POLLHUP);
}

static void host_back(void) {
  if (!port_async) return;
  fcntl(port, F_SETFL, fcntl(port, F_GETFL) & ~O_ASYNC);
  port_async = 0;
}

__attribute__((noreturn)) void agent_main(const struct agent_defaults *d) {
  defs = d;
  signal(SIGPIPE, SIG_IGN);
  port = open_port();
  if (port < 0) _exit(0); /* a host without the agent port: nothing to serve */
  outbox = malloc(OUTBOX_CAP);
  if (!outbox) _exit(1);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SIGIO); /* await_host */
  sigprocmask(SIG_BLOCK, &set, NULL);
  int sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sfd < 0) _exit(1);
  for (int i = 0; i < MAX_STREAMS; i++) streams[i].fd = -1;

  static struct pollfd fds[2 + 3 * MAX_PROCS + MAX_STREAMS];
  for (;;) {
    int n = 0;
    fds[n++] = (struct pollfd){.fd = sfd, .events = POLLIN};
    int port_at = -1;
    if (!host_gone) {
      port_at = n;
      fds[n++] = (struct pollfd){.fd = port, .events = (short)((out_len <= OUTBOX_LOW ? POLLIN : 0) | (out_len ? POLLOUT : 0))};
    }
    int busy = 0, timeout = -1;
    for (int i = 0; i < MAX_PROCS; i++) {
      struct proc *p = &procs[i];
      if (!p->used) continue;
      struct stream *s = find_stream(p->stream);
      int can_read = !s || (s->credit > 0 && out_len <= OUTBOX_LOW);
      if (p->exited && can_read) busy = 1; /* draining after the exit */
      short out_ev = (short)((can_read ? POLLIN : 0) | (p->tty && p->inlen ? POLLOUT : 0));
      if (p->out_fd >= 0 && out_ev) fds[n++] = (struct pollfd){.fd = p->out_fd, .events = out_ev};
      if (p->err_fd >= 0 && can_read) fds[n++] = (struct pollfd){.fd = p->err_fd, .events = POLLIN};
      if (!p->tty && p->in_fd >= 0 && p->inlen) fds[n++] = (struct pollfd){.fd = p->in_fd, .events = POLLOUT};
      if (p->has_deadline && !p->exited && !p->timed_out) {
        long ms = ms_until(&p->deadline);
        if (ms < 0) ms = 0;
        if (timeout < 0 || ms < timeout) timeout = (int)ms;
      }
    }
    for (int i = 0; i < MAX_STREAMS; i++) {
      struct stream *s = &streams[i];
      if ((s->kind == S_READ && s->credit > 0) || s->kind == S_LIST || s->kind == S_PS) busy = 1;
      if (s->kind == S_WATCH && s->credit > 0 && out_len <= OUTBOX_LOW && n < (int)(sizeof fds / sizeof fds[0]))
        fds[n++] = (struct pollfd){.fd = s->fd, .events = POLLIN};
    }
    if (busy && out_len <= OUTBOX_LOW) timeout = 0;
    else if (busy && (timeout < 0 || timeout > 5)) timeout = 5;
    /* A SIGIO wakes us when the host connects; the timeout is only a safety net. */
    if (host_gone && (timeout < 0 || timeout > 5000)) timeout = 5000;
    int ready = poll(fds, n, timeout);
    if (ready < 0 && errno != EINTR) _exit(1);
    host_gone = 0;
    if (fds[0].revents & POLLIN) {
      struct signalfd_siginfo info;
      while (read(sfd, &info, sizeof info) == sizeof info) {
      }
      reap();
    }
    if (port_at >= 0) {
      short ev = fds[port_at].revents;
      if (ev & POLLHUP) {
        /* No host connected (a daemon restart, a snapshot restore): its streams are gone. */
        host_gone = await_host();
        if (!syncing || out_len) {
          reset_streams();
          syncing = 1;
          inbox_len = 0;
        }
      } else {
        host_back();
        if (ev & POLLIN) read_port();
      }
    }
    check_deadlines();
    pump_sources();
    if (!host_gone) flush_outbox();
  }
}
