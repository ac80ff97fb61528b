"""``prune``: token pruning by attention importance, one module per framework family.

- :mod:`.vit`: EViT (strategy ``"cls"``) on timm ViTs and open_clip visual towers, between each block's
  attention and its MLP;
- :mod:`.vlm`: FastV, VTC-CLS, STAR, PLPHP, TransPrune, ZOO-Prune and VFlowOpt on transformers vision-language
  models, tokens removed from the sequence and the KV cache;
- here: the :class:`Prune` method, its options and checks.
"""

from __future__ import annotations

from typing import Any

from ...errors import OptionError, UnsupportedModelError
from ...frameworks import Target
from ...frameworks.base import select_layers, vit_blocks
from ...options import choice_option, float_option, int_option, layers_option
from ...patching import Handle, Patcher
from ...registry import Method, register
from . import vit, vlm
from .vit import PruneHandle, PruneStep

__all__ = ["Prune", "PruneHandle", "PruneStep"]


@register
class Prune(Method):
    name = "prune"
    summary = ("drop the least important image tokens: EViT on ViTs (fused into one token); FastV, VTC-CLS, "
               "STAR, PLPHP, TransPrune, ZOO-Prune, VFlowOpt on vision-language models (removed from sequence and "
               "KV cache)")
    paper = ("strategy 'cls': Liang et al., 2022, 'Not All Patches are What You Need: Expediting Vision "
             "Transformers via Token Reorganizations' (EViT, ICLR 2022); on transformers vision-language models "
             "FastV, VTC-CLS, STAR, PLPHP, TransPrune, ZOO-Prune and VFlowOpt (visattn.processors.prune.vlm)")
    frameworks = ("timm", "open_clip", "transformers")
    families = {"timm": ("VisionTransformer", "VisionTransformerDistilled", "Eva", "Beit", "NaFlexVit"),
                "open_clip": ("VisionTransformer",)}
    options = (
        choice_option("strategy", "cls", ("cls", "fastv", "star", "plphp", "transprune", "zo", "vflowopt"),
                      doc="how tokens are ranked: 'cls' = [CLS] attention (EViT; VTC-CLS on LLaVA); the others "
                          "are for transformers vision-language models (see visattn.processors.prune.vlm)"),
        float_option("keep", 0.7, low=0.0, high=1.0, low_open=True, identity=1.0,
                     doc="fraction of image tokens kept at each chosen block"),
        layers_option("layers", None, doc="blocks that prune (None: depth/4, depth/2, 3*depth/4, as EViT)"),
        int_option("layer", None, low=0, allow_none=True,
                   doc="transformers: decoder layer before which tokens are dropped (None: 2, as FastV; star: L/2)"),
        layers_option("ensemble_layers", None,
                      doc="transformers, cls/star: vision-tower layers whose [CLS] attention is averaged "
                          "(None: the layer feeding the projector)"),
        int_option("directions", 64, low=1, doc="zo: random directions of the zeroth-order estimate").scoped(
            strategies=("zo",)),
        float_option("step", 0.01, low=0.0, low_open=True, doc="zo: size of each perturbation").scoped(
            strategies=("zo",)),
        int_option("seed", 0, low=0, doc="zo: seed of the random directions").scoped(strategies=("zo",)),
        float_option("threshold", 30.0, low=0.0, doc="vflowopt: global tokens receive more than threshold times the "
                     "mean attention (the authors' released settings: 28.7 to 39.3)").scoped(strategies=("vflowopt",)),
        int_option("cell", 12, low=1, doc="vflowopt: pruned tokens of each cell of cell x cell patches are recycled "
                   "into one").scoped(strategies=("vflowopt",)),
        float_option("entropy", 0.0, low=0.0, doc="vflowopt: weight of the patches' information entropy (softmax over "
                     "the image) beside the attention relevance (the authors' released settings: 0)").scoped(
            strategies=("vflowopt",)),
    )

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        super().check_target(target, options)
        if target.framework == "transformers":
            return vlm.check_target(target, options)
        if options["strategy"] != "cls" or options["layer"] is not None or options["ensemble_layers"] is not None:
            raise OptionError(f"prune: on {target.framework} models only strategy 'cls' with options keep and layers "
                              f"applies; strategy {options['strategy']!r}, layer and ensemble_layers are for "
                              f"transformers vision-language models")
        blocks = vit_blocks(target)
        select_layers([str(i) for i in range(len(blocks))], options["layers"], self.name)
        model = target.model  # NaFlexVit keeps its class token in its embeds
        if target.framework == "timm" and getattr(getattr(model, "embeds", model), "cls_token", None) is None:
            raise UnsupportedModelError(
                f"prune: strategy 'cls' ranks tokens by [CLS] attention, and this {target.family} has no class "
                f"token (class_token=False)")

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> Handle:
        if target.framework == "transformers":
            return vlm.install(target, patcher, options)
        return vit.install(target, patcher, options)
