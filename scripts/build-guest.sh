#!/usr/bin/env bash
# Builds what every guest boots: Debian's cloud kernel (its ELF vmlinux, for QEMU's PVH boot),
# the virtio modules Cocoon needs, the static cocoon-init, and an initramfs of the two.
# Idempotent and quick when nothing changed: everything is cached under $COCOON_CACHE_DIR
# (default <repo>/.cache), keyed by the kernel package version and the init's source hash.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${COCOON_CACHE_DIR:-$repo/.cache}
# The modules the guest loads, in any order: depmod works out the load order.
wanted_modules=(virtio_mmio virtio_net virtio_blk virtio_console)

log() { echo "guest: $*" >&2; }

# One scratch directory for the whole run, removed however the script ends.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

kernel_package() {
  local pkg
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    # No apt lists yet: refresh them once.
    apt-get update -qq >&2
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  echo "$pkg"
}

fetch_kernel() {
  local pkg=$1 dir=$2
  [ -s "$dir/vmlinux" ] && [ -s "$dir/modules/order" ] && return 0
  log "fetching kernel package $pkg"
  local tmp=$scratch/kernel
  mkdir -p "$tmp"
  (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1) || { log "apt-get download $pkg failed"; return 1; }
  dpkg-deb -x "$tmp"/*.deb "$tmp/root"
  local kver vmlinuz offset
  kver=$(ls "$tmp/root/lib/modules")
  vmlinuz=$(ls "$tmp"/root/boot/vmlinuz-*)
  # The bzImage carries an lz4 (legacy frame) compressed ELF; QEMU boots that ELF directly (PVH).
  offset=$(grep -obUaP '\x02\x21\x4c\x18' "$vmlinuz" | head -1 | cut -d: -f1)
  [ -n "$offset" ] || { log "no lz4 payload in $vmlinuz"; return 1; }
  # lz4 exits non-zero on the bytes that follow the payload; the ELF check below is the real test.
  tail -c +$((offset + 1)) "$vmlinuz" | lz4 -dc > "$tmp/vmlinux" 2>/dev/null || true
  readelf -h "$tmp/vmlinux" >/dev/null 2>&1 || { log "extracted vmlinux is not an ELF file"; return 1; }
  depmod -b "$tmp/root" "$kver"
  mkdir -p "$tmp/modules"
  : > "$tmp/modules/order"
  local m path name
  for m in "${wanted_modules[@]}"; do
    while read -r _ path _; do
      name=$(basename "$path")
      grep -qx "$name" "$tmp/modules/order" && continue
      cp "$path" "$tmp/modules/$name"
      echo "$name" >> "$tmp/modules/order"
    done < <(modprobe -d "$tmp/root" -S "$kver" --show-depends "$m" | grep '^insmod')
  done
  echo "$kver" > "$tmp/kernel-release"
  mkdir -p "$(dirname "$dir")"
  rm -rf "$dir.partial" && mkdir "$dir.partial"
  mv "$tmp/vmlinux" "$tmp/modules" "$tmp/kernel-release" "$dir.partial/"
  rm -rf "$dir" && mv "$dir.partial" "$dir"
  log "kernel $kver ready in $dir"
}

build_init() {
  local src=$repo/src/guest/init out=$1
  [ -x "$out" ] && return 0
  log "building cocoon-init (with the guest agent)"
  mkdir -p "$(dirname "$out")"
  musl-gcc -static -Os -Wall -Wextra -Werror -Wno-unused-parameter -o "$out.tmp" "$src/cocoon-init.c" "$src/agent.c"
  strip "$out.tmp"
  mv "$out.tmp" "$out"
}

build_initramfs() {
  local kdir=$1 init=$2 out=$3
  [ -s "$out" ] && return 0
  local tmp=$scratch/initramfs
  mkdir -p "$tmp/lib/modules/cocoon" "$tmp/dev" "$tmp/proc" "$tmp/sys"
  cp "$init" "$tmp/init"
  cp "$kdir"/modules/*.ko "$kdir/modules/order" "$tmp/lib/modules/cocoon/"
  (cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 > "$out.tmp")
  mv "$out.tmp" "$out"
}

main() {
  local pkg version kdir
  pkg=$(kernel_package)
  [ -n "$pkg" ] || { log "cannot find Debian's linux-image-cloud-amd64 package"; exit 1; }
  version=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
  kdir=$cache/kernel/$pkg-$version
  fetch_kernel "$pkg" "$kdir"
  local init_hash init initramfs
  init_hash=$(cat "$repo"/src/guest/init/*.c "$repo"/src/guest/init/*.h | sha256sum | cut -c1-16)
  init=$cache/guest/cocoon-init-$init_hash
  build_init "$init"
  initramfs=$cache/guest/initramfs-$pkg-$version-$init_hash.cpio
  build_initramfs "$kdir" "$init" "$initramfs"
  # The runtime reads this manifest to find the current guest artifacts.
  cat > "$cache/guest/guest.json.tmp" <<JSON
{"kernel": "$kdir/vmlinux", "initramfs": "$initramfs", "kernelRelease": "$(cat "$kdir/kernel-release")", "initHash": "$init_hash"}
JSON
  mv "$cache/guest/guest.json.tmp" "$cache/guest/guest.json"
}

main "$@"
