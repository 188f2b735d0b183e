"""Preference-loss core: pure functions on per-sample tensors, shared by every modality.

Each function takes per-sample surrogates (log-likelihoods, denoising errors, rewards) and returns
``(loss, metrics)``: ``loss`` a scalar tensor, ``metrics`` a dict of detached scalar tensors with stable names
(``rewards/chosen``, ``rewards/margins``, ``rewards/accuracies``, ...). No models, no I/O, and nothing imported
from the rest of mmalign: only torch and the standard library.

Conventions: half-precision inputs are computed in float32, float64 stays float64; inputs are never broadcast
(shapes must match exactly, else ``ValueError`` naming the arguments and shapes); each docstring states the
formula, its paper, the scale its default beta assumes and what a tie does.
"""

from .diffusion import FLOW_BETA_SCHEDULES, diffusion_dpo_loss, flow_dpo_loss, mapo_loss
from .dpo import DPO_LOSS_TYPES, dpo_loss
from .ranked import RANKED_WEIGHTINGS, ranked_dpo_loss, ranked_sequence_dpo_loss
from .reward import bt_loss, btt_loss, soft_ce_loss
from .rwr import rwr_loss
from .spo import spo_step_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "FLOW_BETA_SCHEDULES",
    "RANKED_WEIGHTINGS",
    "bt_loss",
    "btt_loss",
    "diffusion_dpo_loss",
    "dpo_loss",
    "flow_dpo_loss",
    "mapo_loss",
    "ranked_dpo_loss",
    "ranked_sequence_dpo_loss",
    "rwr_loss",
    "soft_ce_loss",
    "spo_step_loss",
]
