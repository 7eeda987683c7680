"""Count the calls of one op while a block runs: `with OpCalls(torch.ops.aten._to_copy.default) as calls: ...`."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpCalls(TorchDispatchMode):
    """A dispatch mode counting how often `op` (an OpOverload) is dispatched inside the with block."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op, self.count = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is self.op
        return func(*args, **(kwargs or {}))
