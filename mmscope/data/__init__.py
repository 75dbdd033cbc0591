"""Data: GQA loaders, the study's question sets, a synthetic GQA-format world, and probe datasets."""
