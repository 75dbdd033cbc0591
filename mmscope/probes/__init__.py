"""Layer-wise probing: frozen features per layer and simple probes trained on them."""

from mmscope.probes.features import POOLINGS, layer_features
from mmscope.probes.train import (
    PROBE_KINDS,
    ProbeConfig,
    ProbeError,
    control_labels,
    fit_probe,
    layerwise,
    probe_predictions,
    shuffled_labels,
    split,
)

__all__ = ["POOLINGS", "PROBE_KINDS", "ProbeConfig", "ProbeError", "control_labels", "fit_probe", "layer_features",
           "layerwise", "probe_predictions", "shuffled_labels", "split"]
