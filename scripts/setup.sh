#!/usr/bin/env bash
# Installs everything uigniter needs on a Debian 12 host, idempotently:
# Debian packages, npm dependencies, the TypeScript build, the guest init,
# the example apps and the guest kernel. Safe to run again; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."

# qemu: the VMM. linux-source-6.1 .. libelf-dev, xz-utils, binutils: the guest kernel build.
# gcc, libc6-dev: the static guest init and the examples. squashfs-tools, e2fsprogs: disk images.
# cpio: tests check our archives with it. memcached: an example app. nginx: the gateway benchmark's baseline.
# linux-image-cloud-amd64: the fallback guest kernel (kernel.source "debian-cloud"), its modules
# and their modules.dep; lz4 (Debian 12's kernel payload), zstd: decompress the bzImage payload or modules.
# iproute2, nftables: the bridge network (bridge, taps, NAT, published ports). python3: the network
# tests hand-craft a hostile guest's packets with it. dnsmasq-base: the DHCP server on the bridge for
# unikernels. busybox-static: test guests (udhcpc, sh) in rootfs images. curl: the demo.
# etcd-server, etcd-client: the cluster's store (the cluster tests start three members). wrk: the gateway
# benchmark's load generator, a C program in its own process. docker-registry (the OCI distribution
# registry), skopeo, umoci: the OCI image tests make images and push them to a registry they start;
# apache2-utils: htpasswd (bcrypt) for the registry's basic auth in those tests. libcap2-bin: setcap and
# getcap, for the tests of file capabilities in image layers.
PACKAGES=(qemu-system-x86 linux-source-6.1 flex bison bc libelf-dev xz-utils binutils make gcc libc6-dev
  squashfs-tools e2fsprogs cpio memcached nginx linux-image-cloud-amd64 lz4 zstd iproute2 nftables python3
  dnsmasq-base busybox-static curl etcd-server etcd-client wrk docker-registry skopeo umoci apache2-utils libcap2-bin
  debootstrap fio)

say() { echo "setup: $*"; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: these Debian packages are missing. Install them as root, then run this again:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm ci only when package-lock.json changed since the last install.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm dependencies"
  npm ci --no-audit --no-fund --loglevel=error
fi

say "compiling TypeScript"
npx tsc -p .
chmod +x dist/src/daemon/main.js

# C parts: rebuilt when their source is newer than the binary.
build_c() { # out src flags...
  local out=$1 src=$2; shift 2
  if [ ! -x "$out" ] || [ "$src" -nt "$out" ]; then
    mkdir -p "$(dirname "$out")"
    gcc "$@" -Wall -Wextra -Werror -o "$out.tmp" "$src" && mv "$out.tmp" "$out"
  fi
}
build_c build/uigniter-init src/guest/init/uigniter-init.c -static -Os -s
build_c build/examples/hello examples/hello/hello.c -O2

# `uigniter` on the PATH, so that the README's commands work as written (root: /usr/local/bin).
if [ "$(id -u)" = 0 ]; then
  ln -sfn "$PWD/dist/src/daemon/main.js" /usr/local/bin/uigniter
elif ! command -v uigniter >/dev/null; then
  say "uigniter is not on the PATH; as root: ln -s $PWD/dist/src/daemon/main.js /usr/local/bin/uigniter"
fi

node dist/src/daemon/main.js kernel build
