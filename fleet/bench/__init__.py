"""Benchmarks that print measured figures (`fleet bench ...`).

infer.py  the inference-optimization table: precision, ONNX Runtime, caches, chunk recycling, LoRA merge
          (its measures in infer_measure.py, one timing per technique in infer_techniques.py, output in
          infer_report.py)
serve.py  served vs raw batched throughput and latency at several fleet sizes
"""
