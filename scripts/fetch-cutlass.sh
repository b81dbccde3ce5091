#!/usr/bin/env bash
# Puts the CUTLASS/CuTe headers epmoe's Hopper grouped GEMM builds against into
# third_party/cutlass-<version>/ (git-ignored): include/ (cutlass, cute) and tools/util/include/.
# Source: PyPI's nvidia-cutlass wheel, one pinned version. A wheel already in .whl/ is used as it
# is (machines without network: carry .whl/nvidia_cutlass-<version>-py3-none-any.whl there);
# otherwise `pip download` fetches it into .whl/. Idempotent: does nothing when the headers are in
# place. The build finds them through -DEPMOE_CUTLASS_DIR (default: this folder).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=4.2.0.0
DEST=third_party/cutlass-4.2.0
[ -f "$DEST/include/cutlass/cutlass.h" ] && [ -f "$DEST/tools/util/include/cutlass/util/packed_stride.hpp" ] && exit 0
WHL=.whl/nvidia_cutlass-$VERSION-py3-none-any.whl
if [ ! -f "$WHL" ]; then
  mkdir -p .whl
  python3 -m pip download --quiet --no-deps --retries 1 --timeout 20 "nvidia-cutlass==$VERSION" -d .whl
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 - "$WHL" "$TMP" <<'PY'
import sys, zipfile
prefixes = ("cutlass_library/source/include/", "cutlass_library/source/tools/util/include/")
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith(prefixes)])
PY
rm -rf "$DEST"
mkdir -p "$DEST/tools/util"
mv "$TMP/cutlass_library/source/include" "$DEST/include"
mv "$TMP/cutlass_library/source/tools/util/include" "$DEST/tools/util/include"
echo "CUTLASS $VERSION headers in $DEST"
