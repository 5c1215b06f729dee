"""What Dynamo is compiling when it calls the backend: the frame's code and the model it belongs to.

A graph alone cannot tell whether it holds the whole model: a graph break splits a model into graphs
that each look like a smaller model (a break inside the block loop makes Dynamo compile one
``Block.forward`` on its own, and one such graph then serves every block). The Python stack at the
backend call still holds the frame being compiled (Dynamo's ``frame`` argument) and the module the user
compiled (``OptimizedModule._orig_mod``), or the module frames running eagerly around the graph; from
those the passes count the model's attention modules and read its prefix tokens.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["DynamoFrame", "current_frame", "RESUME_PREFIX"]

# Dynamo names the function that continues a frame after a graph break torch_dynamo_resume_in_<fn>_at_<line>.
RESUME_PREFIX = "torch_dynamo_resume_in_"


@dataclass(frozen=True)
class DynamoFrame:
    """The frame Dynamo traced into the graph the backend is given."""

    code_name: str  # e.g. "forward", "torch_dynamo_resume_in_forward_features_at_1300"
    where: str  # "file:line" of the code's first line
    owner: Optional[nn.Module]  # the frame's ``self``, when a module
    model: Optional[nn.Module]  # the module the user compiled (or the outermost one around the graph)

    @property
    def resumes(self) -> bool:
        """Whether the graph continues a frame after a graph break (its first part was another graph)."""
        return self.code_name.startswith(RESUME_PREFIX)

    def describe(self) -> str:
        owner = f"{type(self.owner).__name__}." if self.owner is not None else ""
        return f"{owner}{self.code_name} ({self.where})"


def _in_torch(code: types.CodeType) -> bool:
    name = code.co_filename.replace("\\", "/")
    return "/torch/" in name or "/tomec/" in name or "/passes/" in name


def current_frame() -> Optional[DynamoFrame]:
    """The frame being compiled, read off the Python stack of a backend call; None elsewhere."""
    from torch._dynamo.eval_frame import OptimizedModule

    compiled, outer_modules, model = None, [], None
    f = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if "_dynamo" in code.co_filename:
            if compiled is None:
                frame = f.f_locals.get("frame")
                if frame is not None and isinstance(getattr(frame, "f_code", None), types.CodeType):
                    compiled = frame
            owner = f.f_locals.get("self")
            if isinstance(owner, OptimizedModule):
                model = owner._orig_mod
                break  # what lies further out is the user's code around the compiled module
        elif compiled is not None and not _in_torch(code):
            owner = f.f_locals.get("self")
            if isinstance(owner, nn.Module):
                outer_modules.append(owner)
        f = f.f_back
    if compiled is None:
        return None
    code = compiled.f_code
    try:
        owner = compiled.f_locals.get("self")
    except Exception:  # a frame whose locals cannot be read: no owner
        owner = None
    owner = owner if isinstance(owner, nn.Module) else None
    if model is None:  # a compiled function: the outermost module running around the graph
        model = outer_modules[-1] if outer_modules else owner
    return DynamoFrame(
        code_name=code.co_name, where=f"{code.co_filename}:{code.co_firstlineno}", owner=owner, model=model
    )
