"""`hvdtrain quantize`: int8 round trips in their runtimes, the accuracy guard, bad input."""
import json

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
