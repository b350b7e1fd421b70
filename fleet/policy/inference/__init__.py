"""How a trained policy runs at serving time: the backends the server selects and what speeds them up.

backend.py        PolicyBackend, TorchBackend, make_backend (torch fp32 / bf16 / int8)
onnx_backend.py   OnnxBackend: ONNX Runtime fp32 / int8
precision.py      precision conversion and checks
encoder_cache.py  EncoderCache: a robot's image tokens reused while its frame is unchanged
lora.py           LoRA adapters, with merge
"""
