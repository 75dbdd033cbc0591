"""The names of the sites an intervention reads or edits (`mmscope.context` reads them from the running model).

They live here, importing nothing, so that the command line can check a `--site` without importing torch.
"""

SITES = ("residual", "attention", "mlp")
VISION_SITES = ("vision_residual", "vision_attention", "vision_mlp", "projector")  # the projector is layer 0
