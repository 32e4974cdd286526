"""Inference: loading a trained model, the `Predictor`, batch prediction, visualization, ONNX export and the selection inspector."""
