"""The dtypes the library computes in, and the one map between their names and torch dtypes.

Two spellings exist because two audiences read them: the short names ("fp32", "fp16", "bf16")
of command lines, CSV columns and the tuned-config keys, and torch's own names ("float32",
"float16", "bfloat16") that `patch.json` stores, as transformers' `config.json` does.
Narrower sets (what the Gluon kernels take, what the AOT check compiles) live with their code
and are written in these dtypes.
"""

from __future__ import annotations

from typing import Mapping

import torch

DTYPE_NAMES: Mapping[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SUPPORTED_DTYPES = tuple(DTYPE_NAMES)
TORCH_DTYPE_NAMES: Mapping[torch.dtype, str] = {dtype: str(dtype).removeprefix("torch.") for dtype in SUPPORTED_DTYPES}


def dtype_from_name(name: str, names: Mapping[torch.dtype, str] = DTYPE_NAMES, what: str = "dtype") -> torch.dtype:
    """The dtype spelled `name` in `names` (`DTYPE_NAMES` or `TORCH_DTYPE_NAMES`); a ValueError
    naming `what` and the choices otherwise."""
    for dtype, candidate in names.items():
        if candidate == name:
            return dtype
    raise ValueError(f"{what} must be one of {sorted(names.values())}, got {name!r:.60}")


def weight_and_bias_in(weight: torch.Tensor, bias: torch.Tensor | None,
                       dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`weight` and `bias` (None stays None) in `dtype`, or as they are where `dtype` is None: how a
    `weight_dtype` option turns one matrix's tensors into what its layer keeps."""
    if dtype is None:
        return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)
