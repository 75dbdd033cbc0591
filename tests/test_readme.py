"""The README's quick start, run verbatim: its first Python block, as a new user pastes it into a file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    return re.search(r"## Quick start\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_the_quick_start_runs_as_written_and_its_comments_say_what_it_gives(tmp_path):
    script = tmp_path / "quick_start.py"
    checks = '''
assert (sample.question, sample.answer, sample.boxes) == (
    "What color is the sphere, blue or red?", "red", [(9.0, 25.0, 12.0, 12.0)])
assert list(example.layout) == ["system", "roles", "question", "instruction", "image", "last", "object",
                                "other_patches", "random_patches"], list(example.layout)
assert tuple(window) == (2, 3, 4, 5, 6) and model.generate_answer(example) == "red"
assert tuple(model.hidden_states(example).shape[:2]) == (model.n_layers + 1, 1)
assert probs.shape == (1, len(model.tokenizer)) and clean.shape == (len(model.tokenizer),)
print("quick start ran")
'''
    script.write_text(quick_start() + checks)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("quick start ran")
