/* The guest agent (agent.c), started by cocoon-init in a process of its own. */
#ifndef COCOON_AGENT_H
#define COCOON_AGENT_H

#include <sys/types.h>

/* What processes get unless a request says otherwise: the workload's identity and environment. */
struct agent_defaults {
  uid_t uid;
  gid_t gid;
  const gid_t *groups;
  int ngroups;
  char **envp; /* NULL-terminated */
  const char *cwd;
};

/* Serves the host on the "cocoon.agent" port; never returns. */
void agent_main(const struct agent_defaults *defaults) __attribute__((noreturn));

#endif
