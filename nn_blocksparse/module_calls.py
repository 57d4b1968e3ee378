"""`called_plainly(module)`: whether calling a module would run nothing but its class's forward.

Code that calls a module's parts itself (the thin BERT layer, `AttentionBlock`) may skip a module's
call, or what it returns, only where nobody could see the difference: no forward or backward hooks,
the module's own or global ones, no forward set on the instance (a wrapper, as offloading
libraries set), and no `module.compile()` (whose compiled call runs instead of the forward).
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules import module as module_globals


def called_plainly(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or getattr(module, "_compiled_call_impl", None) is not None
                or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
                or module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks)
