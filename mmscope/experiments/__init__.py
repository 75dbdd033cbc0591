"""Experiments: each one a declaration in its own module (knockout, lens, truncate, patch, map, probe,
evaluate), executed by one runner (`mmscope.experiments.runner`); `mmscope.cli` generates a command from each."""
