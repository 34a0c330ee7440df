#!/usr/bin/env bash
# test.sh: set everything up (scripts/setup.sh), then run the C tests under ASan+UBSan (the threaded engines also
# under TSan) and the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== C tests (AddressSanitizer + UndefinedBehaviorSanitizer)"
cmake -S . -B build/asan -DDYNSNAP_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build build/asan -j"$(nproc)" >/dev/null
ctest --test-dir build/asan --output-on-failure --timeout 300
echo "== C tests of the threaded engines (ThreadSanitizer)"
cmake -S . -B build/tsan -DDYNSNAP_TSAN=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build build/tsan -j"$(nproc)" >/dev/null
# setarch -R (where allowed): GCC 12's TSan cannot map its shadow under the larger ASLR of recent kernels.
noaslr=(); setarch "$(uname -m)" -R true 2>/dev/null && noaslr=(setarch "$(uname -m)" -R)
"${noaslr[@]}" ctest --test-dir build/tsan --output-on-failure --timeout 300 -R '^test_(h2d|memfd|gms)_'
echo "== Python tests"
# pytest exits 5 when it collected nothing: that is a failure here, like any non-zero status.
.venv/bin/python -m pytest "$@"
