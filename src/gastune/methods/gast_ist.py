"""``gast+ist`` — GAST's per-layer sample choice restricted to the layers IST keeps active.

Each optimizer step IST (``gastune.methods.ist``) picks ``int(0.25·L)`` layers by its learned
importance scores and freezes the rest (``requires_grad=False``, ``.grad`` None, Adam state
kept). GAST (Yao et al., EACL 2026, arXiv 2603.09865; ``gastune.engine``) then runs on the
active layers only: the support gradient is computed for their adapters alone, the engine
arms only their blocks, and each active block is updated with its own K best-aligned samples
(softmax draw). Frozen layers get no update and cost no per-sample gradients; below the
lowest active layer back-propagation does not run at all.

The mask is the GAST mask (K ones per column) with the frozen columns zeroed.
"""

from __future__ import annotations

from gastune.methods.base import METHODS, register_method
from gastune.methods.ist import ist_policy
from gastune.methods.layerwise import LayerwiseMethod


@register_method("gast+ist")
def _gast_ist(config, support_dataset=None, **kwargs) -> LayerwiseMethod:
    gast = METHODS["gast"](config, support_dataset=support_dataset, **kwargs)
    return LayerwiseMethod(ist_policy(config), name="gast+ist", inner=gast)
