#!/usr/bin/env bash
# setup.sh: install everything dynsnap needs on a Debian/Ubuntu machine (idempotent; run as root):
# system packages, a CRIU >= 4.1 (the distribution's, or Debian 13's in /opt/dynsnap/criu), and the package
# with its test extras into .venv at the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "setup: $*" >&2; }
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"

pkgs=(liburing-dev libaio-dev libxxhash-dev pkg-config gcc g++ make fio)
command -v cmake >/dev/null || pkgs+=(cmake)
python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# CRIU: the distribution's when it is >= 4.1, else Debian 13's package set in a private prefix.
criu_ok() { "$1" --version 2>/dev/null | awk '/Version:/ {split($2,v,"."); exit !((v[1]>4)||(v[1]==4&&v[2]>=1))}'; }
if [[ -n "${DYNSNAP_CRIU:-}" ]] && criu_ok "$DYNSNAP_CRIU"; then
    log "CRIU from DYNSNAP_CRIU=$DYNSNAP_CRIU"
elif command -v criu >/dev/null && criu_ok "$(command -v criu)"; then
    log "CRIU from the system: $(criu --version | head -1)"
else
    if ! criu_ok /opt/dynsnap/criu/bin/criu; then
        if apt-cache policy criu 2>/dev/null | awk '/Candidate:/ {split($2,v,"."); exit !((v[1]>4)||(v[1]==4&&v[2]>=1))}'; then
            log "installing the distribution's CRIU"
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq criu >/dev/null
        else
            log "the distribution's CRIU is older than 4.1: installing Debian 13's into /opt/dynsnap/criu"
            $SUDO scripts/criu-bundle.sh /opt/dynsnap/criu
        fi
    fi
fi

# Python: the package (C, Cython and pybind11 extensions) with test extras, in .venv.
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel >/dev/null
log "building and installing dynsnap-core into .venv"
.venv/bin/python -m pip install -q -e '.[test]'
log "ready: $(.venv/bin/dynsnap --version)"
