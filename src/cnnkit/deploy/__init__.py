"""Deployment: verified ONNX export (with int8 quantization) and the web service."""
