# Shared by the setup scripts (sourced, not run): a log line and an idempotent apt-get install
# that refreshes the package lists only when the install fails with the lists the machine has
# (a fresh machine's are often stale or empty), without standard input.

say() { echo "setup: $*" >&2; }

# apt_install PACKAGE...: installs them as root, or stops with what to install when not root.
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    say "missing Debian packages: $*; run this as root or install them with apt-get"
    exit 1
  fi
  say "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null 2>&1; then
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
  fi
}
