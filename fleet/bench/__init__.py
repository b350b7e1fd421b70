"""Benchmarks that print measured figures (`fleet bench ...`).

infer.py  the inference-optimization table: precision, ONNX Runtime, caches, chunk recycling, LoRA merge
serve.py  served vs raw batched throughput and latency at several fleet sizes
"""
