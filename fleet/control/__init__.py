"""Robot-side control: safety, chunk recycling, confidence, degradation. numpy only: no torch, no Ray."""
