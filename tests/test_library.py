"""Library mode and the Python API under real ranks: users' own Horovod scripts switching to hvdtrain's
optimizer / tape with top-k and reading through hvdtrain's shard reader; hvdtrain.fit; the venv's Keras."""
import json
import sys

import pytest

from conftest import BIN, REPO, hvdtrain, run

RANKS = REPO / "tests/ranks"


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    hvdtrain("data", "shard", "--source", "digits", "--out", str(out), "--shards", "4", "--chunk-samples", "32")
    return out


def horovod_script(script: str, shards, which: str, out) -> dict:
    run([str(BIN / "horovodrun"), "-np", "2", "--gloo", sys.executable, str(RANKS / script), str(shards), which,
         str(out)], timeout=400)
    return json.loads(out.read_text())


@pytest.mark.parametrize("script", ["horovod_mnist_torch.py", "horovod_mnist_tf.py"])
def test_a_horovod_script_switches_to_hvdtrain_topk_and_keeps_its_accuracy(script, digits_shards, tmp_path):
    horovod = horovod_script(script, digits_shards, "horovod", tmp_path / "horovod.json")
    topk = horovod_script(script, digits_shards, "topk", tmp_path / "topk.json")
    print(f"{script} np=2: Horovod's optimizer {horovod['accuracy']:.4f}, hvdtrain top-k 5% {topk['accuracy']:.4f}")
    assert horovod["ranks_equal"] and topk["ranks_equal"]
    assert horovod["accuracy"] > 0.9
    assert topk["accuracy"] >= horovod["accuracy"] - 0.02
    if "bytes_per_step" in topk:  # torch: the exchange reports what it sent, far below the dense 4 B x params
        assert 0 < topk["bytes_per_step"] < 0.3 * 4 * 27_000


@pytest.mark.parametrize("which", ["torch", "keras"])
def test_fit_trains_a_users_model_from_python(which, tmp_path):
    proc = run([str(BIN / "horovodrun"), "-np", "2", "--gloo", sys.executable, str(RANKS / "fit_script.py"), which,
                str(tmp_path / "run")], timeout=400)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["weights_identical"]
    assert summary["final"]["test_accuracy"] > 0.9 and summary["final"]["compression"] == "fp16"
    assert "fit: " in proc.stdout


def test_every_venv_process_uses_tf_keras():
    """Users' plain Horovod TensorFlow scripts need Keras 2: setup makes the venv select it for every process."""
    proc = run([sys.executable, "-c", "import os, tensorflow as tf; print(os.environ['TF_USE_LEGACY_KERAS'], "
                                      "type(tf.keras.layers.Dense(1)).__module__)"], timeout=120)
    flag, module = proc.stdout.split()
    assert flag == "1" and module.startswith("tf_keras"), proc.stdout
