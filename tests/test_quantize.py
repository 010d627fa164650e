"""`hvdtrain quantize`: int8 round trips in their runtimes, the accuracy guard, bad input."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, hvdtrain

# SGD as the quantize stage was tuned with: 150 steps of it reach about 96%
SHORT = ["data.source=digits", "train.max_steps=150", "train.warmup_steps=10", "train.optimizer=sgd", "train.lr=0.05",
         "train.scale_lr=linear", "train.momentum=0.9"]


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torch") / "run"
    hvdtrain("train", "--config", str(REPO / "configs/digits-torch.yaml"), "--run-dir", str(run_dir), *SHORT)
    return run_dir


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tf") / "run"
    hvdtrain("train", "--config", str(REPO / "configs/digits-tf.yaml"), "--run-dir", str(run_dir), *SHORT)
    return run_dir


def report_of(run_dir):
    return json.loads((run_dir / "quantize/quantize_report.json").read_text())["formats"][0]


def test_onnx_int8_round_trip(torch_run):
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    hvdtrain("quantize", "--run-dir", str(torch_run), "--format", "onnx", "--calibration", "256")
    fmt = report_of(torch_run)
    assert fmt["format"] == "onnx" and fmt["within_bound"]
    assert fmt["int8"]["agreement"] >= 0.95 and fmt["size_ratio"] < 0.4
    assert fmt["fp32"]["latency_ms_b1"] > 0 and fmt["int8"]["latency_ms_b32"] > 0
    # the int8 model runs in onnxruntime on its own and contains integer tensors
    session = ort.InferenceSession(fmt["int8"]["path"], providers=["CPUExecutionProvider"])
    x = (load_digits().images[:8] / 16).astype(np.float32)[:, None]
    assert session.run(None, {"input": x})[0].shape == (8, 10)
    import onnx
    model = onnx.load(fmt["int8"]["path"])
    assert any(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer)
    assert (torch_run / "quantize/quantize_report.md").read_text().startswith("# Quantization report")


def test_tflite_int8_round_trip(tf_run):
    from ai_edge_litert.interpreter import Interpreter

    hvdtrain("quantize", "--run-dir", str(tf_run), "--format", "tflite", "--calibration", "256")
    fmt = report_of(tf_run)
    assert fmt["format"] == "tflite" and fmt["within_bound"] and fmt["int8"]["name"] == "full-integer int8"
    assert fmt["int8"]["agreement"] >= 0.95 and fmt["size_ratio"] < 0.4
    interpreter = Interpreter(model_path=fmt["int8"]["path"])
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.int8


def test_guard_trips_on_a_bad_calibration_set(torch_run, tmp_path):
    x = (np.random.default_rng(0).normal(0, 1000, size=(200, 1, 8, 8))).astype(np.float32)
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(200) % 10)
    hvdtrain("data", "shard", "--source", f"npz:{tmp_path / 'bad.npz'}", "--out", str(tmp_path / "bad"),
             "--shards", "1")
    proc = hvdtrain("quantize", "--run-dir", str(torch_run), "--format", "onnx", "--max-accuracy-drop", "0.5",
                    "--calibration-data", str(tmp_path / "bad/train"), check=False)
    assert proc.returncode == 1
    assert "no int8 model within 0.5 points of fp32" in proc.stderr and "Traceback" not in proc.stderr
    fmt = report_of(torch_run)
    assert not fmt["within_bound"]
    tried = [t["name"] for t in fmt["tried"]]
    assert any("Entropy" in t for t in tried) and any("Percentile" in t for t in tried)
    assert any("in float" in t for t in tried)  # the sensitive layers were tried in float too


def test_missing_or_corrupt_checkpoint_is_exit_2(torch_run, tmp_path):
    proc = hvdtrain("quantize", "--run-dir", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "no config.yaml" in proc.stderr
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.yaml").write_text((torch_run / "config.yaml").read_text())
    (broken / "checkpoints/ckpt-00000150.pt").write_bytes(b"not a checkpoint")
    proc = hvdtrain("quantize", "--run-dir", str(broken), check=False)
    assert proc.returncode == 2 and "not a readable hvdtrain checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = hvdtrain("quantize", "--run-dir", str(torch_run), "--format", "tflite", check=False)
    assert proc.returncode == 2 and "a torch run exports onnx" in proc.stderr


def test_tflite_runs_a_group_norm_unet_at_any_batch():
    """tf-keras's GroupNormalization converts, at a free batch size, to a broadcast LiteRT cannot prepare
    (measured: BROADCAST_TO failed to prepare, ai-edge-litert 2.3.0): such models are fixed at batch 1 and
    larger batches are fed a sample at a time, with the Keras model's outputs."""
    pytest.importorskip("tensorflow")
    import hvdtrain.tf  # noqa: F401
    from hvdtrain.quantize import tflite_path
    from hvdtrain.tf import models

    model = models.unet((4, 16, 16), num_classes=3, width=8, depth=1)
    x = np.random.default_rng(0).random((5, 4, 16, 16), dtype=np.float32)
    with tempfile.TemporaryDirectory() as out:
        predict = tflite_path.session(tflite_path.convert(model, Path(out) / "unet.tflite", None))
        np.testing.assert_allclose(predict(x), model(x).numpy(), atol=1e-4)
        int8 = tflite_path.session(tflite_path.convert(model, Path(out) / "unet-int8.tflite", x))
        assert int8(x).shape == (5, 16, 16, 3)
