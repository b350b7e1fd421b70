"""How a trained policy runs at serving time: the backends the server selects and what speeds them up.

base.py           PolicyBackend: the interface and the staged forward every backend shares
backend.py        TorchBackend (torch fp32 / bf16 / int8), make_backend
onnx_backend.py   OnnxBackend: ONNX Runtime fp32 / int8
precision.py      precision conversion and checks
encoder_cache.py  EncoderCache: a robot's image tokens reused while its frame is unchanged
lora.py           LoRA adapters, with merge
"""
