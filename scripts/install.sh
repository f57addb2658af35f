#!/usr/bin/env bash
# Prepare this machine for vmorch: system packages, the libvirt-qemu user, the .venv.
# For a fresh Debian 12, run as root. Idempotent: a second run only checks.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(python3-venv python3-dev gcc pkg-config libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu
          qemu-system-x86 qemu-utils redis-server iproute2
          docker-compose  # the tests validate compose/docker-compose.yml (no Docker engine needed)
          chromium)       # the dashboard's browser tests (driven by playwright, no browser download)
VENV=.venv
STAMP=$VENV/.vmorch-installed

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_packages() {
    command -v dpkg-query >/dev/null || die "no dpkg-query: this script expects Debian 12; install ${PACKAGES[*]} yourself"
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "system packages: all present"
        return
    fi
    is_root || die "missing packages: ${missing[*]}; run this script as root (or: sudo $0)"
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
}

create_qemu_user() {
    # libvirt's embedded QEMU driver resolves its compiled-in default user (libvirt-qemu)
    # before it reads qemu.conf, so the account must exist even though QEMU runs as root.
    if getent passwd libvirt-qemu >/dev/null && getent group kvm >/dev/null; then
        say "user libvirt-qemu: present"
        return
    fi
    is_root || die "the libvirt-qemu user is missing; run this script as root"
    say "creating the kvm and libvirt-qemu groups and the libvirt-qemu system user"
    getent group kvm >/dev/null || groupadd --system kvm
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin -g libvirt-qemu -G kvm libvirt-qemu
}

note_system_redis() {
    # The Debian package may run its own redis-server on port 6379. vmorch never uses it:
    # 'vmorch up' and the tests start private servers on free ports. Leave it alone.
    say "redis-server: $(command -v redis-server) (vmorch starts its own servers; a system service, if any, is left alone)"
}

create_venv() {
    local python
    python=$(command -v python3) || die "no python3 on PATH"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$python is $("$python" -V 2>&1); vmorch needs Python 3.11 or newer"
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        say "virtualenv $VENV: present"
    else
        say "creating $VENV with $python ($("$python" -V 2>&1))"
        rm -rf "$VENV"
        "$python" -m venv "$VENV"
    fi
    if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
        say "python packages: up to date"
        return
    fi
    say "installing vmorch and its dev tools into $VENV"
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    touch "$STAMP"
}

install_packages
create_qemu_user
note_system_redis
create_venv
say "ready: $VENV/bin/vmorch up --detach   (or: make demo, make test)"
