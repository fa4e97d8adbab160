"""The GAST gradient engine: per-sample, per-block gradients formed during back-propagation."""

from gastune.engine.gast import GastEngine
from gastune.engine.loss import has_target_tokens, per_sample_loss
from gastune.engine.settings import GastSettings
from gastune.engine.support import support_gradients

__all__ = ["GastEngine", "GastSettings", "has_target_tokens", "per_sample_loss", "support_gradients"]
