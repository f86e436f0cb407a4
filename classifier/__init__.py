"""triaged's classifier: features, ONNX model, micro-batcher, training. Never imports `proxy`."""
