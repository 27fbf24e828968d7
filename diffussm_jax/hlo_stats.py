"""Reading XLA's optimised HLO text: the layout changes (transposes and copies) a program makes.

A transpose in optimised HLO may only relabel dimensions (its layout makes it a bitcast); the
data moves where a copy, or a transpose whose layout differs from its operand's, rewrites a
buffer. `layout_ops` lists both kinds with their sizes and the JAX op they came from, so that
a test or a benchmark can count the ones big enough to matter (activations, not weights).
"""

from __future__ import annotations

import dataclasses
import math
import re

_INSTRUCTION = re.compile(
    r"%(?P<name>[\w.\-]+) = (?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]\{(?P<layout>[\d,]*)\} "
    r"(?P<op>transpose|copy)\("
)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class LayoutOp:
    name: str
    opcode: str  # "transpose" or "copy"
    shape: tuple[int, ...]
    dtype: str
    source: str  # the JAX op name in the metadata, "" where XLA made the op itself

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def layout_ops(hlo_text: str, min_elements: int = 0) -> list[LayoutOp]:
    """Every transpose and copy in `hlo_text` (fused computations included) holding at least
    `min_elements` elements."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        shape = tuple(int(d) for d in match["dims"].split(",") if d)
        source = _OP_NAME.search(line)
        op = LayoutOp(
            match["name"], match["op"], shape, match["dtype"], source[1] if source else ""
        )
        if op.elements >= min_elements:
            found.append(op)
    return found
