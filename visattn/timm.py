"""timm entry points: configured layer and block classes for ``timm.create_model``'s factory flags.

Importing this module registers ``attn_layer="visattn_bra"`` in timm's ``ATTN_LAYERS`` (so does
``import visattn`` when timm is imported already). Options go through configured classes::

    import timm, visattn
    model = timm.create_model("vit_base_patch16_224", attn_layer=visattn.timm.bra(n_win=7, topk=4))
    model = timm.create_model("vit_base_patch16_224", block_fn=visattn.timm.tome_block(r=13))
    model = timm.create_model("vit_base_patch16_224", block_fn=visattn.timm.prune_block(keep=0.7, layers=(3, 6, 9)))

The layers and blocks keep timm's parameter names, so ``pretrained=True`` checkpoints load unchanged, and
give what ``visattn.apply`` gives with the same options; building the model without the flag builds the
stock model. A model that would not use a flag (parallel blocks build their own attention), or whose parameter
names the flag would change (``attn_layer`` over a model's own ``"diff"`` attention, ``block_fn`` over parallel
blocks), is refused by ``timm.create_model`` with an :class:`~visattn.errors.OptionError`: importing this module
wraps ``timm.create_model`` so that calls passing one of visattn's flags are checked (other calls run timm's
function unchanged). A ``create_model`` bound before visattn was imported (``from timm import create_model``) is
timm's own, and unchecked.
"""

from __future__ import annotations

from typing import Any

from .errors import OptionError
from .frameworks.timm import block_fn_class, guard_factory, register_attn_layer
from .options import validate_options
from .processors.bra import bra, timm_layer
from .processors.prune import Prune
from .processors.prune.vit import PruneStep
from .processors.tome import Tome
from .processors.tome.vit import TomeStep

__all__ = ["bra", "prune_block", "tome_block"]

register_attn_layer("visattn_bra", timm_layer())
guard_factory()


def tome_block(r: int | list[int] = 8, *, prop_attn: bool = True, strict: bool = False,
               num_prefix_tokens: int = 1) -> type:
    """A block class for ``create_model(..., block_fn=tome_block(r=13))``: ToMe in every block (see
    :mod:`visattn.processors.tome.vit`). ``r``: tokens removed per block, or a list per block (later blocks
    remove none); ``num_prefix_tokens``: the model's class and register tokens (never merged)."""
    if isinstance(r, tuple):
        raise OptionError("tome_block: an (r, inflect) schedule needs the model's depth; give r as an int or as a "
                          "list of ints, one per block")
    values = validate_options("tome", Tome.options, dict(r=r, prop_attn=prop_attn, strict=strict))
    _check_prefix("tome_block", num_prefix_tokens)
    r = values["r"]
    step = TomeStep(list(r) if isinstance(r, list) else [], num_prefix_tokens, values["prop_attn"], False,
                    values["strict"], beyond=0 if isinstance(r, list) else r)
    return block_fn_class(step, "TomeBlock")


def prune_block(keep: float = 0.7, *, layers: tuple[int, ...] | list[int], num_prefix_tokens: int = 1) -> type:
    """A block class for ``create_model(..., block_fn=prune_block(keep=0.7, layers=(3, 6, 9)))``: EViT's pruning
    at the blocks ``layers`` (see :mod:`visattn.processors.prune.vit`; give them, the block class does not know
    the model's depth); ``num_prefix_tokens``: the model's class and register tokens (always kept)."""
    values = validate_options("prune", Prune.options, dict(strategy="cls", keep=keep, layers=layers))
    if values["layers"] is None:
        raise OptionError("prune_block: give layers, the blocks that prune (EViT's are depth/4, depth/2 and "
                          "3*depth/4: (3, 6, 9) for 12 blocks); the block class does not know the model's depth")
    _check_prefix("prune_block", num_prefix_tokens)
    if num_prefix_tokens < 1:
        raise OptionError("prune_block: EViT ranks tokens by the class token's attention; the model needs one "
                          "(num_prefix_tokens >= 1)")
    chosen = set(values["layers"]) if values["keep"] < 1.0 else set()
    return block_fn_class(PruneStep(values["keep"], num_prefix_tokens, chosen), "PruneBlock")


def _check_prefix(name: str, num_prefix_tokens: Any) -> None:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise OptionError(f"{name}: num_prefix_tokens must be an int >= 0 (got {num_prefix_tokens!r})")
