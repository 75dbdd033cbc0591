"""Layer-wise probing: frozen features per layer and simple probes trained on them."""

from mmscope.probes.features import POOLINGS, layer_features
from mmscope.probes.train import ProbeConfig, fit_probe, layerwise

__all__ = ["POOLINGS", "ProbeConfig", "fit_probe", "layer_features", "layerwise"]
