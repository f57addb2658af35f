#!/usr/bin/env bash
# Prepare this machine for vmorch: system packages, the libvirt-qemu user, the .venv.
# For a fresh Debian 12, run as root; it needs nothing but bash (no make, git or curl).
# Idempotent: a second run only checks, in a second or so.
# Quiet: it prints a few progress lines. apt's and pip's output goes to .venv/install.log
# (appended, one header per run); if a step fails, the script prints the log's last 40
# lines and its path, and exits non-zero.
# Python packages come from requirements.lock (pinned, with hashes; see README.md,
# "Refreshing the lock file"); vmorch itself is then installed editable, without deps.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(python3-venv python3-dev gcc pkg-config libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu
          qemu-system-x86 qemu-utils redis-server iproute2
          dosfstools mtools syslinux  # the bootable test/demo guest image (orchestrator/localcluster/guestimage.py)
          genisoimage                 # cloud-init NoCloud seeds (ISO 9660, label cidata)
          dnsmasq-base tcpdump nftables  # vmorch networks: DHCP, 'net capture', isolation and NAT
          udhcpc iputils-ping            # the network tests' DHCP client and ping (tests/test_netdev.py)
          docker-compose  # the tests validate compose/docker-compose.yml (no Docker engine needed)
          chromium)       # the dashboard's browser tests (driven by playwright, no browser download)
VENV=.venv
LOCK=requirements.lock
STAMP=$VENV/.vmorch-installed  # holds the checksums of what the venv was installed from
LOG=$VENV/install.log
LOG_TAIL=40

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

log_started=
logged() {  # logged WHAT COMMAND...: COMMAND's output goes to $LOG; if it fails, show the log's end and stop
    local what=$1 rc=0
    shift
    if [ -z "$log_started" ]; then
        mkdir -p "$VENV"
        printf '\n===== %s: scripts/install.sh\n' "$(date '+%F %T')" >>"$LOG"
        log_started=1
    fi
    printf '\n$ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        {
            printf 'install.sh: %s failed (exit %d). The last %d lines of %s:\n' "$what" "$rc" "$LOG_TAIL" "$PWD/$LOG"
            tail -n "$LOG_TAIL" "$LOG" | sed 's/^/  | /'
            printf 'install.sh: %s failed; full log: %s\n' "$what" "$PWD/$LOG"
        } >&2
        exit "$rc"
    fi
}

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
    say "installing with apt-get (a few minutes; log: $LOG): ${missing[*]}"
    logged "apt-get update" apt-get update
    logged "apt-get install" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${PACKAGES[@]}"
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

wanted_stamp() {  # what the venv must have been installed from: the lock, pyproject.toml, the interpreter
    sha256sum "$LOCK" pyproject.toml
    "$VENV/bin/python" -c 'import sys; print(sys.version)'
}

create_venv() {
    local python
    python=$(command -v python3) || die "no python3 on PATH"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$python is $("$python" -V 2>&1); vmorch needs Python 3.11 or newer"
    [ -f "$LOCK" ] || die "$LOCK is missing: run this script from a full copy of the repository"
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        say "virtualenv $VENV: present"
    else
        say "creating $VENV with $python ($("$python" -V 2>&1))"
        if [ -d "$VENV" ]; then  # a broken venv: start again, but keep this run's log
            find "$VENV" -mindepth 1 -maxdepth 1 ! -name "$(basename "$LOG")" -exec rm -rf {} +
        fi
        logged "creating $VENV" "$python" -m venv "$VENV"
    fi
    if [ -f "$STAMP" ] && [ "$(wanted_stamp)" = "$(cat "$STAMP")" ]; then
        say "python packages: up to date with $LOCK"
        return
    fi
    say "installing the python packages of $LOCK (hash-checked), then vmorch itself (log: $LOG)"
    rm -f "$STAMP"
    logged "pip install -r $LOCK" "$VENV/bin/python" -m pip install --no-input --require-hashes -r "$LOCK"
    # Editable installs can't be hash-checked; --no-deps: everything came from the lock, and
    # --no-build-isolation: the build uses the lock's setuptools instead of fetching one.
    logged "pip install -e ." "$VENV/bin/python" -m pip install --no-input --no-deps --no-build-isolation -e .
    wanted_stamp >"$STAMP"
}

install_packages
create_qemu_user
note_system_redis
create_venv
say "ready: $VENV/bin/vmorch up --detach   (or: bash scripts/demo.sh, bash scripts/test.sh)"
