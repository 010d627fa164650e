#!/usr/bin/env bash
# The main job end to end on scikit-learn's digits: 2 Horovod ranks, then an accuracy check.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PATH="$REPO/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"  # horovodrun imports TensorFlow to list frameworks
NP="${NP:-2}"
MIN_ACCURACY="${MIN_ACCURACY:-0.97}"
RUN_DIR="${RUN_DIR:-runs/digits-torch-$(date +%Y%m%d-%H%M%S)}"

hvdtrain data shard --source digits --out data/digits --shards 8 --chunk-samples 64
hvdtrain data verify data/digits >/dev/null
horovodrun -np "$NP" hvdtrain train --config configs/digits-torch.yaml --run-dir "$RUN_DIR"

python - "$RUN_DIR/summary.json" "$MIN_ACCURACY" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
accuracy, bound = summary["final"]["test_accuracy"], float(sys.argv[2])
print(f"demo: {summary['world_size']} ranks, {summary['steps']} steps, test accuracy {accuracy:.4f} "
      f"(needs >= {bound}), weights identical on all ranks: {summary['weights_identical']}")
if accuracy < bound or not summary["weights_identical"]:
    sys.exit("demo: FAILED")
PY
echo "demo: run directory $REPO/$RUN_DIR"
