"""`DerivedCopy`: a copy derived from one weight tensor (oneDNN's packed weight, the kernel's transposed
blocks), kept between calls and made again when the weight changes.

"Changes" is what the tensor can tell: another tensor, other storage, shape or dtype, or a write in
place through itself or a view (its version counter). A write that bypasses the version counter
(through `.data`, a NumPy view, or raw memory) is not seen until `clear()`: so every owner makes
keeping one opt-in (`prepack=True`). A tensor made under `torch.inference_mode` has no version
counter: nothing is kept for it (`of` returns None and the caller reads the weight itself).

The entry is one attribute, replaced whole, so a thread reading it while another replaces it sees
either the old weight's copy with the old key or the new one's, never a mixed pair. Copies and pickles
of an owner get an empty one (an opaque oneDNN tensor has no storage to copy): it is made again on
first use.
"""

from __future__ import annotations

from typing import Callable

import torch


class DerivedCopy:
    """`derive(weight)` of the last weight asked for, kept while that weight is unchanged (module docstring)."""

    __slots__ = ("_derive", "_entry")

    def __init__(self, derive: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._derive = derive
        self.clear()

    def clear(self) -> None:
        """Forget the copy: the next `of` derives it from the weight as it lies."""
        self._entry = None  # (weight, key, copy)

    def kept(self) -> torch.Tensor | None:
        """The copy kept now, if any, without checking it against a weight."""
        entry = self._entry
        return None if entry is None else entry[2]

    def of(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The copy derived from `weight` (made now if the kept one is of another weight or an older
        version of it), or None for an inference tensor, whose in-place writes could not be seen."""
        if weight.is_inference():
            return None
        key = (weight.data_ptr(), weight.shape, weight.dtype, weight._version)
        entry = self._entry
        # The weight itself is kept, not its id: a new tensor at a freed one's address is another weight.
        if entry is None or entry[0] is not weight or entry[1] != key:
            entry = self._entry = (weight, key, self._derive(weight.detach()))
        return entry[2]

    def __reduce__(self):
        return DerivedCopy, (self._derive,)  # copies and pickles are empty
