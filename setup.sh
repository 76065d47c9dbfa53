#!/usr/bin/env bash
# Set up dvmm on a Debian 12 machine: system packages, the virtual
# environment at .venv/ with dvmm installed, and the cached guest artifacts.
# Idempotent.  Debian packages are installed as root (through sudo when run
# as another user).
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(
  python3 python3-venv
  qemu-system-x86 qemu-utils qemu-system-gui
  seabios ipxe-qemu
  busybox-static cpio kmod e2fsprogs binutils gcc libc6-dev
  iproute2 dnsmasq-base socat
  dpdk-dev librte-net-vhost23 librte-net-tap23 librte-mempool-ring23
  bubblewrap docker.io docker-compose debootstrap python3-seccomp
)

if [ "${DVMM_SKIP_APT:-0}" != 1 ]; then
  SUDO=()
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "setup.sh: installing system packages needs root: run it as root, or install sudo (or set DVMM_SKIP_APT=1)" >&2
      exit 1
    fi
    SUDO=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

# Kernel + initramfs for the Linux test guest (cached; rebuilt only when missing).
.venv/bin/dvmm guest build
echo "setup.sh: ready — .venv/bin/dvmm --help"
