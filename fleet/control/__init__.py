"""Robot-side control: safety, chunk recycling, confidence, degradation. numpy only: no torch, no Ray."""

from fleet.control.action_buffer import AGGREGATES, ALIGNS, ActionBuffer, BufferConfig
from fleet.control.confidence import Confidence, ConfidenceConfig, ConfidenceEstimator, FeatureStats
from fleet.control.degradation import DegradationConfig, DegradationPolicy, State, Transition
from fleet.control.safety import SafetyConfig, SafetyLayer, SafetyReport

__all__ = [
    "AGGREGATES",
    "ALIGNS",
    "ActionBuffer",
    "BufferConfig",
    "Confidence",
    "ConfidenceConfig",
    "ConfidenceEstimator",
    "DegradationConfig",
    "DegradationPolicy",
    "FeatureStats",
    "SafetyConfig",
    "SafetyLayer",
    "SafetyReport",
    "State",
    "Transition",
]
