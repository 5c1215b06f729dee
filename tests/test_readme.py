"""The README as a new user reads it: every ``tomec.…`` name it uses resolves after ``import tomec``
(in a fresh interpreter, so no other test's imports hide a missing one), and its Python examples run
offline (random weights, a cut depth, the rewritten graph run eagerly)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
NAME = re.compile(r"(?<![\w.])((?:torch\.ops\.)?tomec(?:\.[A-Za-z_]\w*)+)")


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_names_resolve_after_import_tomec():
    names = sorted(set(NAME.findall(README.read_text())))
    assert "tomec.reference.patch" in names and "tomec.bench.throughput.run" in names  # the walk sees them
    script = f"""
import json, torch, tomec
tomec.kernels.load()  # registers the torch.ops.tomec kernels, as the README says
missing = []
for name in {names!r}:
    parts = name.split(".")
    obj = torch.ops if name.startswith("torch.ops.") else tomec
    try:
        for part in parts[2:] if name.startswith("torch.ops.") else parts[1:]:
            obj = getattr(obj, part)
    except AttributeError as e:
        missing.append(f"{{name}}: {{e}}")
print(json.dumps(missing))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def _offline(block: str) -> str:
    """The example as a test can run it: random weights, two blocks, the graph run without Inductor."""
    block = block.replace("pretrained=True", "pretrained=False, depth=2")
    return block.replace("tomec.backend(", 'tomec.backend(compiler="eager", ')


def test_readme_python_examples_run():
    """In order, in one namespace, as a reader runs them (later examples use the first one's imports)."""
    import timm
    import torch

    torch.manual_seed(0)
    namespace = {
        "model": timm.create_model("deit_small_patch16_224", pretrained=False, depth=2).eval(),
        "images": torch.randn(1, 3, 224, 224),
    }
    blocks = _code_blocks("python")
    assert len(blocks) >= 3
    for index, block in enumerate(blocks):
        torch._dynamo.reset()
        with torch.no_grad():
            exec(compile(_offline(block), f"README.md python block {index}", "exec"), namespace)
    assert namespace["logits"].shape == (1, 1000)
