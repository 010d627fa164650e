#!/usr/bin/env bash
# The main job end to end on scikit-learn's digits: HDF5 shards, then 2 Horovod ranks with PyTorch and
# with TensorFlow/Keras, each checked for accuracy and identical weights on all ranks.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PATH="$REPO/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"  # horovodrun imports TensorFlow to list frameworks
NP="${NP:-2}"
MIN_ACCURACY="${MIN_ACCURACY:-0.97}"
STAMP="$(date +%Y%m%d-%H%M%S)"

hvdtrain data shard --source digits --out data/digits --shards 8 --chunk-samples 64
hvdtrain data verify data/digits >/dev/null

check() {  # check RUN_DIR: accuracy bound and identical weights, from summary.json
    python - "$1/summary.json" "$MIN_ACCURACY" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
accuracy, bound = summary["final"]["test_accuracy"], float(sys.argv[2])
print(f"demo: {summary['framework']}: {summary['world_size']} ranks, {summary['steps']} steps, test accuracy "
      f"{accuracy:.4f} (needs >= {bound}), weights identical on all ranks: {summary['weights_identical']}")
if accuracy < bound or not summary["weights_identical"]:
    sys.exit("demo: FAILED")
PY
}

for framework in torch tf; do
    run_dir="runs/digits-$framework-$STAMP"
    horovodrun -np "$NP" hvdtrain train --config "configs/digits-$framework.yaml" --run-dir "$run_dir"
    check "$run_dir"
    hvdtrain quantize --run-dir "$run_dir"   # int8 ONNX (PyTorch) / TFLite (TensorFlow), with the accuracy guard
    echo "demo: run directory $REPO/$run_dir"
done
