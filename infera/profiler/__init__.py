"""Where the time goes: a roofline model of a model on a hardware spec (``roofline``, ``hardware``),
and a measured per-operator profile of the engine beside it (``profile``); PNG plots (``plot``)."""
from infera.profiler.hardware import GPUS, HardwareSpec, get_hardware
from infera.profiler.roofline import ModelShape, RooflineReport, StepShape, WeightLayout, analyze, phase_report

__all__ = ["GPUS", "HardwareSpec", "ModelShape", "RooflineReport", "StepShape", "WeightLayout", "analyze",
           "get_hardware", "phase_report"]
