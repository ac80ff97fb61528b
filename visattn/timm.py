"""timm entry points: configured layer classes for ``timm.create_model``'s factory flags.

Importing this module registers ``attn_layer="visattn_bra"`` in timm's ``ATTN_LAYERS`` (so does
``import visattn`` when timm is imported already). Options go through a configured class::

    import timm, visattn
    model = timm.create_model("vit_base_patch16_224", attn_layer=visattn.timm.bra(n_win=7, topk=4))

The layers keep timm's parameter names, so ``pretrained=True`` checkpoints load unchanged.
"""

from __future__ import annotations

from .frameworks.timm import register_attn_layer
from .processors.bra import bra, timm_layer

__all__ = ["bra"]

register_attn_layer("visattn_bra", timm_layer())
