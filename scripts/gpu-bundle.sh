#!/usr/bin/env bash
# gpu-bundle.sh: pack what a GPU machine without package access lacks into .gpubundle/ (carried by the device tool).
#
#   scripts/gpu-bundle.sh            -> .gpubundle/criu.tar.gz   (CRIU 4.1 prefix, unpack into /opt/dynsnap/)
#                                       .gpubundle/deps/{include,lib} (liburing, libaio, xxhash from Debian 12)
#                                       .gpubundle/bin/fio           (static fio from Debian 12's source package:
#                                                                     libaio, io_uring, psync; the device limit)
#                                       .gpubundle/wheels/*.whl      (kvikio-cu13 + libkvikio-cu13 + rapids-logger,
#                                                                     no dependencies: the GPU image has the rest)
# Runs on a Debian 12 machine with apt access. Idempotent; scripts/gpu-check.sh consumes the result.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.gpubundle
STAGE=${DYNSNAP_CRIU_STAGE:-/tmp/dynsnap-criu-stage}
mkdir -p "$B"

# keep the bundle out of git
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpubundle/' "$exclude" 2>/dev/null || echo '/.gpubundle/' >> "$exclude"

# 1. CRIU: a relocatable prefix (wrapper at criu/bin/criu), packed as criu/...
if [[ ! -s "$B/criu.tar.gz" ]]; then
    mkdir -p "$STAGE"
    scripts/criu-bundle.sh "$STAGE/criu" --tar "$B/criu.tar.gz"
fi

# 2. build dependencies the GPU machine has no headers for (Debian 12 = glibc 2.36, runs on newer hosts)
PKGS=(liburing-dev liburing2 libaio-dev libaio1 libxxhash-dev libxxhash0)
if [[ ! -e "$B/deps/.done" ]]; then
    work=$(mktemp -d /tmp/dynsnap-gpubundle.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download "${PKGS[@]}" >/dev/null)
    mkdir -p "$work/root"
    for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
    rm -rf "$B/deps"
    mkdir -p "$B/deps/include" "$B/deps/lib"
    cp -a "$work/root/usr/include/." "$B/deps/include/"
    for d in "$work/root/usr/lib/x86_64-linux-gnu" "$work/root/lib/x86_64-linux-gnu"; do
        [[ -d "$d" ]] && cp -a "$d/." "$B/deps/lib/"
    done
    # pkg-config files point at /usr: make them relative to the prefix
    if [[ -d "$B/deps/lib/pkgconfig" ]]; then
        sed -i 's|^prefix=.*|prefix=${pcfiledir}/../..|; s|^libdir=.*|libdir=${prefix}/lib|; s|^includedir=.*|includedir=${prefix}/include|' \
            "$B"/deps/lib/pkgconfig/*.pc
    fi
    printf '%s\n' "${PKGS[@]}" > "$B/deps/PACKAGES"
    dpkg-deb -f "$work"/liburing-dev*.deb Version | sed 's/^/liburing-dev /' >> "$B/deps/PACKAGES"
    touch "$B/deps/.done"
fi

# 3. fio (the device-limit reference of `dynsnap bench io`): Debian 12's source package, built static with only
#    the engines we compare against (libaio, io_uring, psync/sync); a private apt source list, like criu-bundle.sh
if [[ ! -x "$B/bin/fio" ]]; then
    fwork=$(mktemp -d /tmp/dynsnap-fio.XXXXXX)
    mkdir -p "$fwork/lists/partial" "$fwork/cache/archives/partial"
    echo "deb-src ${DYNSNAP_DEBIAN_MIRROR:-http://deb.debian.org/debian} bookworm main" > "$fwork/sources.list"
    fio_apt=(-o "Dir::Etc::SourceList=$fwork/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$fwork/lists" -o "Dir::Cache=$fwork/cache" -o Dir::State::status=/dev/null
             -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
    apt-get "${fio_apt[@]}" -qq update
    (cd "$fwork" && apt-get "${fio_apt[@]}" -qq --download-only source fio)
    tar -C "$fwork" -xzf "$fwork"/fio_*.orig.tar.gz
    src=$(find "$fwork" -maxdepth 1 -type d -name 'fio-*' | head -1)
    # --disable-native: the GPU machine's CPU is not this one; static: runs on any x86-64 Linux
    (cd "$src" && ./configure --build-static --disable-native --disable-numa --disable-rdma --disable-rados \
        --disable-rbd --disable-http --disable-gfapi --disable-pmem --disable-libnfs --disable-lex \
        --disable-xnvme --disable-libzbc --disable-tcmalloc --disable-dfs >"$fwork/configure.log" \
        && grep -q '^CONFIG_LIBAIO=y' config-host.mak && make -j"$(nproc)" fio >"$fwork/make.log" 2>&1) \
        || { echo "gpu-bundle: fio build failed; logs in $fwork" >&2; exit 1; }
    mkdir -p "$B/bin"
    strip -o "$B/bin/fio" "$src/fio"
    "$B/bin/fio" --version
    "$B/bin/fio" --enghelp | grep -qw io_uring || { echo "gpu-bundle: fio lacks io_uring" >&2; exit 1; }
    rm -rf "$fwork"
fi

# 4. kvikio (optional `gpu` extra, compared by `bench weights` and the GPU tests): the wheels alone, without their
#    dependencies. The GPU machine's image already has cupy-cuda13x, numpy, packaging and nvidia-cufile for
#    CUDA 13; pulling kvikio's dependencies would carry ~2 GB of CUDA wheels. gpu-check.sh installs them with
#    --no-deps into a private target directory there.
KVIKIO_WHEELS=(${DYNSNAP_KVIKIO_WHEELS:-kvikio-cu13 libkvikio-cu13 rapids-logger})
if [[ ! -e "$B/wheels/.done" ]]; then
    rm -rf "$B/wheels"
    mkdir -p "$B/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --dest "$B/wheels" "${KVIKIO_WHEELS[@]}"
    printf '%s\n' "${KVIKIO_WHEELS[@]}" > "$B/wheels/.done"
fi

echo "gpu-bundle: $(du -sh "$B" | cut -f1) in $B"
du -sh "$B"/* | sed 's/^/  /'
