"""Layer-wise probing: frozen features per layer and simple probes trained on them."""

from mmscope.probes.features import POOLINGS, layer_features
from mmscope.probes.train import ProbeConfig, control_labels, fit_probe, layerwise, shuffled_labels, split

__all__ = ["POOLINGS", "ProbeConfig", "control_labels", "fit_probe", "layer_features", "layerwise", "shuffled_labels",
           "split"]
