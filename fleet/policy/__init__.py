"""The multi-embodiment VLA policy (torch): tokenizer, encoders, backbone, heads, checkpoints, training."""
