"""Export to ONNX and TensorRT engine directories; see README "Export"."""
