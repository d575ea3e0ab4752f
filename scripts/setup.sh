#!/usr/bin/env bash
# Installs everything Cocoon needs, idempotently, and quickly when it is all there already:
# Debian packages (QEMU, buildah, the guest build toolchain), npm packages (which bring the
# Node 24 that Cocoon runs on, whatever the machine's Node is), the guest kernel and
# cocoon-init, the host's sparse-file helper, the system user QEMU runs as (when root), and
# the builder's offline base images, and the AWS clients of the compatibility tests (a Python
# venv with boto3, the AWS CLI and its lambda-microvms model: scripts/setup-aws-clients.sh).
#
#   bash scripts/setup.sh            # everything
#   COCOON_SKIP_BASE_IMAGES=1 ...    # not the base images (they take ~25 s once per machine)
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/apt.sh
. scripts/lib/apt.sh

# Debian packages, by the command or file that proves each is installed.
packages=(
  qemu-system-x86:/usr/bin/qemu-system-x86_64
  qemu-utils:/usr/bin/qemu-img
  e2fsprogs:/usr/sbin/mkfs.ext4
  busybox-static:/bin/busybox
  kmod:/usr/bin/kmod
  lz4:/usr/bin/lz4
  musl-tools:/usr/bin/musl-gcc
  binutils:/usr/bin/readelf
  cpio:/usr/bin/cpio
  util-linux:/usr/bin/fallocate
  buildah:/usr/bin/buildah
  runc:/usr/sbin/runc
  containernetworking-plugins:/usr/lib/cni/bridge
  iptables:/usr/sbin/iptables
  debootstrap:/usr/sbin/debootstrap
  uidmap:/usr/bin/newuidmap
  ca-certificates:/etc/ssl/certs/ca-certificates.crt
  zip:/usr/bin/zip
  gcc:/usr/bin/gcc
  passwd:/usr/sbin/useradd
  chromium:/usr/bin/chromium
  tmux:/usr/bin/tmux
  nginx-light:/usr/sbin/nginx
  wrk:/usr/bin/wrk
)

install_system_packages() {
  local missing=() entry
  for entry in "${packages[@]}"; do
    [ -e "${entry#*:}" ] || missing+=("${entry%%:*}")
  done
  # PostgreSQL for the store's conformance suite (test/support/postgres.ts runs a private server
  # from these binaries); its path carries the major version, so it is checked by pattern.
  local postgres_missing=0
  if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    missing+=(postgresql)
    postgres_missing=1
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && [ $postgres_missing = 1 ]; then
    # No system-wide cluster: Cocoon's tests start their own, and an unused server on port
    # 5432 should not appear on a machine just because the tests need the binaries.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/cocoon.conf
  fi
  apt_install "${missing[@]}"
}

install_npm_packages() {
  # The stamp records which package-lock.json the installed node_modules match.
  local stamp=node_modules/.cocoon-lock-hash want
  want=$(sha256sum package-lock.json | cut -d' ' -f1)
  if [ -x node_modules/.bin/node ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  say "installing npm packages (this brings Node 24 as node_modules/.bin/node)"
  npm ci --no-audit --no-fund --loglevel=error >&2
  node_modules/.bin/node --version >/dev/null
  echo "$want" > "$stamp"
}

install_system_packages
install_npm_packages
bash scripts/build-guest.sh
# The sparse-file helper for snapshot checksums and RAM files (src/vmm/native), built once.
node_modules/.bin/node --disable-warning=ExperimentalWarning src/vmm/native/helper.ts >/dev/null
# The listen() shim QEMU runs with (src/vmm/native/listen-shim.ts): forwarded ports with a real backlog.
node_modules/.bin/node --disable-warning=ExperimentalWarning src/vmm/native/listen-shim.ts >/dev/null
# QEMU runs unprivileged, in the group of this system user (src/host/sandbox.ts).
if [ "$(id -u)" = 0 ] && ! getent passwd cocoon-qemu >/dev/null; then
  say "creating the system user cocoon-qemu (QEMU's group)"
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cocoon-qemu
fi
bash scripts/setup-aws-clients.sh
if [ -z "${COCOON_SKIP_BASE_IMAGES:-}" ]; then
  node_modules/.bin/node --disable-warning=ExperimentalWarning src/builder/setup.ts >&2
fi
