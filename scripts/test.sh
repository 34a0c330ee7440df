#!/usr/bin/env bash
# test.sh: set everything up (scripts/setup.sh), then run the C tests under ASan+UBSan and the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== C tests (AddressSanitizer + UndefinedBehaviorSanitizer)"
cmake -S . -B build/asan -DDYNSNAP_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build build/asan -j"$(nproc)" >/dev/null
ctest --test-dir build/asan --output-on-failure --timeout 300
echo "== Python tests"
# pytest exits 5 when it collected nothing: that is a failure here, like any non-zero status.
.venv/bin/python -m pytest "$@"
