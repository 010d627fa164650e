"""Keras model (model.keras of a TensorFlow run) -> TFLite full-integer int8, evaluated in LiteRT."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import hvdtrain.tf  # noqa: F401  (tf-keras before TensorFlow)
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from hvdtrain.errors import ConfigError
from hvdtrain.atomic import atomic_open


def load_model(run_dir: Path):
    path = run_dir / "model.keras"
    if not path.is_file():
        raise ConfigError(f"--run-dir {run_dir}: no model.keras (TensorFlow runs export it when they finish)")
    try:
        return tf.keras.models.load_model(path, compile=False)
    except Exception as exc:  # a truncated or foreign file: one line, not a traceback
        raise ConfigError(f"{path}: not a readable Keras model ({type(exc).__name__})") from None


def convert(model, out: Path, calibration: np.ndarray | None, integer_io: bool = True) -> Path:
    """fp32 when calibration is None; else int8 weights and activations from the representative samples.

    integer_io: int8 input/output too (full integer, for integer-only accelerators); without it the
    model keeps float input/output and may fall back to float kernels where int8 has none.
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        if integer_io:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        else:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    content = converter.convert()
    with atomic_open(out, "wb") as handle:
        handle.write(content)
    return out


def session(path: Path, batch: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A LiteRT predictor for a fixed batch size, quantizing inputs and dequantizing outputs as needed."""
    interpreters: dict[int, tuple] = {}

    def interpreter(n: int):
        if n not in interpreters:
            it = Interpreter(model_path=str(path), num_threads=1)
            detail = it.get_input_details()[0]
            it.resize_tensor_input(detail["index"], [n, *detail["shape"][1:]])
            it.allocate_tensors()
            interpreters[n] = (it, it.get_input_details()[0], it.get_output_details()[0])
        return interpreters[n]

    def predict(x: np.ndarray) -> np.ndarray:
        it, inp, out = interpreter(len(x))
        if inp["dtype"] == np.int8:
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], np.ascontiguousarray(x, inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    return predict
