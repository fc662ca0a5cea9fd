"""recserve build: synthetic data, training, ONNX/TensorRT export and versioned model artifacts."""
