#!/usr/bin/env bash
# Packs the Python packages raymem needs on a lent GPU machine that its image lacks into
# .whl/site.tar.xz, which bench/device_check.sh unpacks there (docs/gpu.md, "What travels to the GPU
# machine"). Nothing can be fetched on that machine and a call carries at most 64 MiB in all, the
# repository's tracked files (25 MB) included; Ray's wheel alone is 79 MB, so the packages are unpacked
# here, the parts of Ray a scan never imports are left out (its Java jars, RLlib, Serve, Tune, Train,
# the LLM and dashboard-client code), and the rest travels xz-compressed (~32 MB).
#
#   bash bench/device_site.sh            # for the device image's Python (3.12)
#   PY=3.11 OUT=/tmp/site311 bash bench/device_site.sh   # another Python, unpacked into OUT, not packed
#
# Then carry it: the `device` tool's run with carry [".whl"] and `bash bench/device_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
PIP=${PIP:-.venv/bin/python -m pip}
# Versions of this checkout's environment (the ones the tests ran with), for the device's Python.
pin() { .venv/bin/python -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
# Not on the device image (docs/gpu.md lists what is): Ray, diffusers, open_clip and their own
# dependencies that are missing there. duckdb (25 MB) does not fit: `raymem query` and the demo's
# closing tables need it, the scan does not.
PACKAGES=(
  "$(pin ray)" "$(pin diffusers)" "$(pin open_clip_torch)" "$(pin pydantic)" "$(pin pydantic_core)"
  "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin ftfy)" "$(pin wcwidth)"
  "$(pin jsonschema)" "$(pin jsonschema-specifications)" "$(pin referencing)" "$(pin rpds-py)"
)
ABI=cp${PY/./}
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp --abi "$ABI" \
  --abi abi3 --abi none "${PLATFORMS[@]}" --platform any --dest "$WORK/wheels" "${PACKAGES[@]}"
# pip's install keeps the wheels' file modes (Ray's raylet and gcs_server must stay executable).
$PIP install -q --no-deps --no-compile --only-binary=:all: --python-version "$PY" --implementation cp \
  "${PLATFORMS[@]}" --target "$WORK/site" "$WORK"/wheels/*.whl
rm -rf "$WORK/site/bin" "$WORK/site/ray/"{jars,rllib,serve,tune,train,llm,dashboard/client}
if [ -n "${OUT:-}" ]; then
  rm -rf "$OUT" && mv "$WORK/site" "$OUT"
  echo "unpacked into $OUT ($(du -sh "$OUT" | cut -f1))"
  exit 0
fi
mkdir -p .whl
rm -f .whl/*.whl .whl/site.tar.xz
tar -C "$WORK/site" -cf - --exclude=__pycache__ . | xz -6 -T0 > .whl/site.tar.xz
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
packed=$(stat -c %s .whl/site.tar.xz)
echo ".whl/site.tar.xz: $((packed / 1048576)) MiB; with the tracked files $(((packed + tracked) / 1048576)) MiB of the 64 MiB a call carries"
[ $((packed + tracked)) -lt $((64 * 1048576)) ] || { echo "too large to carry" >&2; exit 1; }
