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


def _converter(model, fixed_batch: bool):
    if not fixed_batch:
        return tf.lite.TFLiteConverter.from_keras_model(model)
    spec = tf.TensorSpec([1, *model.inputs[0].shape[1:]], model.inputs[0].dtype)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    return tf.lite.TFLiteConverter.from_concrete_functions([function], model)


def _runs_at_batch_two(content: bytes) -> bool:
    """Some graphs convert with a batch-size-dependent broadcast LiteRT cannot prepare (tf-keras's
    GroupNormalization, through tf.nn.weighted_moments); they fail on their first invoke at batch > 1."""
    it = Interpreter(model_content=content, num_threads=1)
    detail = it.get_input_details()[0]
    it.resize_tensor_input(detail["index"], [2, *detail["shape"][1:]])
    try:
        it.allocate_tensors()
        it.set_tensor(detail["index"], np.zeros([2, *detail["shape"][1:]], detail["dtype"]))
        it.invoke()
    except RuntimeError:
        return False
    return True


def convert(model, out: Path, calibration: np.ndarray | None, integer_io: bool = True) -> Path:
    """fp32 when calibration is None; else int8 weights and activations from the representative samples.

    integer_io: int8 input/output too (full integer, for integer-only accelerators); without it the
    model keeps float input/output and may fall back to float kernels where int8 has none.
    The batch size stays free where LiteRT can run the graph so; otherwise the model is fixed at batch 1
    (what an edge device runs) and session() feeds larger batches one sample at a time.
    """
    for fixed_batch in (False, True):
        converter = _converter(model, fixed_batch)
        if calibration is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
            if integer_io:
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
            else:
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                                       tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            content = converter.convert()  # int8 calibration runs the graph: it can fail like an invoke
        except RuntimeError:
            if fixed_batch:
                raise
            continue
        if fixed_batch or _runs_at_batch_two(content):
            break
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
            if not fixed_batch:
                it.resize_tensor_input(detail["index"], [n, *detail["shape"][1:]])
            it.allocate_tensors()
            interpreters[n] = (it, it.get_input_details()[0], it.get_output_details()[0])
        return interpreters[n]

    fixed_batch = Interpreter(model_path=str(path)).get_input_details()[0]["shape_signature"][0] != -1

    def predict(x: np.ndarray) -> np.ndarray:
        if fixed_batch and len(x) > 1:
            return np.concatenate([predict(x[i:i + 1]) for i in range(len(x))])
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
