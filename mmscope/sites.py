"""The names of the sites an intervention reads or edits (`mmscope.context` reads them from the running model).

They live here, importing nothing, so that the command line can check a `--site` without importing torch.
"""

SITES = ("residual", "attention", "mlp")
# One layer numbering for every experiment: decoder layers are 0 … L−1 (a site "after layer ℓ" is decoder layer
# ℓ's output); where an experiment also shows the embeddings (the decoder's input), that point is layer −1,
# labelled "embeddings" in figures.
EMBEDDINGS = -1


def layer_name(layer) -> str:
    """How a layer is written in tables and figures: its number, or "embeddings" for `EMBEDDINGS`."""
    return "embeddings" if layer == EMBEDDINGS else str(layer)
VISION_SITES = ("vision_residual", "vision_attention", "vision_mlp", "projector")  # the projector is layer 0
