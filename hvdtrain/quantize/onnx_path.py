"""PyTorch checkpoint -> ONNX fp32 -> onnxruntime static int8 (QDQ), evaluated in onnxruntime.

Static QDQ with uint8 activations and per-channel int8 weights: on x86 onnxruntime fuses that pair into
integer kernels (VNNI); int8 activations fall back to slow kernels there (measured 6x slower).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_dynamic, quantize_static)
from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                     create_activation_matching,
                                                     modify_model_output_intermediate_tensors)

from hvdtrain.errors import ConfigError

METHODS = {"MinMax": CalibrationMethod.MinMax, "Entropy": CalibrationMethod.Entropy,
           "Percentile": CalibrationMethod.Percentile}
COMPUTE_OPS = {"Conv", "Gemm", "MatMul"}


class Samples(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 32):
        self.batches = [x[i:i + batch] for i in range(0, len(x), batch)]
        self.rewind()

    def get_next(self):
        batch = next(self.iterator, None)
        return None if batch is None else {"input": batch}

    def rewind(self) -> None:
        self.iterator = iter(self.batches)


def export(checkpoint: Path, cfg, inputs, out: Path) -> Path:
    """fp32 ONNX from the checkpoint (weights_only load), then ORT's pre-processing (shape inference).
    Any traceable module exports, the user's factory's too (rebuilt from the run's config)."""
    import torch

    from hvdtrain import models

    torch.manual_seed(cfg.seed)
    model = models.build(cfg, inputs.sample_shape, inputs.num_classes, inputs.label_shape)
    try:
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
    except Exception as exc:  # a truncated or foreign file: one line, not a traceback
        raise ConfigError(f"{checkpoint}: not a readable hvdtrain checkpoint ({type(exc).__name__})") from None
    model.eval()
    fp32 = out / "model-fp32.onnx"
    try:
        torch.onnx.export(model, torch.zeros(1, *inputs.sample_shape), str(fp32), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["outputs"],
                          dynamic_axes={"input": {0: "batch"}, "outputs": {0: "batch"}})
    except Exception as exc:
        raise ConfigError(f"model: {models.source(cfg)} does not export to ONNX ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    prepared = out / "model-fp32-pre.onnx"
    quant_pre_process(str(fp32), str(prepared))
    return prepared


def compact(source: Path, target: Path) -> Path:
    """A copy for shipping with short tensor and node names: QDQ graphs carry a Quantize/Dequantize pair
    per activation, and their long names were 5% of the int8 file (of fp32's size) on the ResNet."""
    model = onnx.load(str(source))
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        return name if not name or name in keep else names.setdefault(name, f"t{len(names)}")

    for initializer in graph.initializer:
        initializer.name = short(initializer.name)
    for i, node in enumerate(graph.node):
        node.name, node.doc_string = f"n{i}", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
    model.doc_string = ""
    onnx.save(model, str(target))
    return target


def session(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": np.ascontiguousarray(x, np.float32)})[0]


def quantize(prepared: Path, out: Path, calibration: np.ndarray, method: str, exclude=()) -> Path:
    quantize_static(str(prepared), str(out), Samples(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=METHODS[method], nodes_to_exclude=list(exclude))
    return out


def quantize_dynamic_int8(prepared: Path, out: Path) -> Path:
    quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def sensitive_nodes(prepared: Path, quantized: Path, samples: np.ndarray, scratch: Path) -> list[list[str]]:
    """Groups of nodes to keep in float, most harmful first, from ORT's per-tensor float/int8 comparison.

    qdq_loss_debug gives each activation's SQNR against the float model (xmodel_err); errors carry
    downstream, so the tensor to blame is where the SQNR drops most. Keeping it in float means keeping
    its producer and its compute consumers in float (excluding only one leaves the tensor quantized).
    """
    float_aug, quant_aug = scratch / "float-aug.onnx", scratch / "quant-aug.onnx"
    modify_model_output_intermediate_tensors(str(prepared), str(float_aug))
    modify_model_output_intermediate_tensors(str(quantized), str(quant_aug))
    matched = create_activation_matching(collect_activations(str(quant_aug), Samples(samples)),
                                         collect_activations(str(float_aug), Samples(samples)))
    errors = compute_activation_error(matched)
    graph = onnx.load(str(prepared)).graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ordered = [out for node in graph.node for out in node.output if out in errors]
    drops = []
    previous = max(errors[t]["xmodel_err"] for t in ordered)  # the first tensor is compared with the best
    for tensor in ordered:
        sqnr = errors[tensor]["xmodel_err"]
        drops.append((previous - sqnr, tensor))
        previous = sqnr
    groups = []
    for _, tensor in sorted(drops, reverse=True):
        group = [producers[tensor].name] if tensor in producers else []
        group += [n.name for n in consumers.get(tensor, []) if n.op_type in COMPUTE_OPS]
        group = [g for g in group if g]
        if group and group not in groups:
            groups.append(group)
    return groups
