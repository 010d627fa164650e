"""Post-training int8 quantization: ONNX (from PyTorch runs) and TFLite (from TensorFlow runs).

The converters (onnxruntime.quantization, TFLiteConverter) do the quantization; this package feeds them
calibration samples from the training shards, evaluates fp32 and int8 models in the runtime that will run
them on the device, applies the metric guard (the run's headline metric) and writes the report.
"""
