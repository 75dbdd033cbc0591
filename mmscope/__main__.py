"""`python -m mmscope …`: the command line (as `torchrun … -m mmscope …` runs it)."""

from mmscope.cli import app

app(prog_name="mmscope")
