#!/usr/bin/env bash
# Builds moekit (warnings are errors; GPU sources compile when nvcc is present) and runs the tests
# that need no GPU. Usage: scripts/test.sh   (after the packages in README.md are installed)
set -euo pipefail
cd "$(dirname "$0")/.."
cmake --preset ci
cmake --build --preset ci
ctest --preset ci -j2 -LE gpu
