"""``bra`` — bi-level routing attention for timm ViTs.

Paper: Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, Sec. 3.2.
The ``h x w`` patch grid is split into ``n_win x n_win`` regions of ``S`` tokens. Region queries and
keys are the means of q and k over each region (Eq. 3: ``Q_r, K_r``); the region affinity is
``A_r = Q_r K_r^T`` (Eq. 4), computed once for all heads from their concatenated channels and
without gradients, as BiFormer does; each region keeps the ``topk`` regions of highest affinity
(``I_r = topk(A_r)``, Eq. 5); every token of a region attends to the tokens of its routed regions
(Eq. 6), plus, with ``lepe=True``, the local context enhancement ``LCE(V)``: a depthwise 5x5 conv on
v (Eq. 7), zero-initialised so that adding it leaves a pretrained model's outputs unchanged until
it is trained. Prefix tokens (class, registers) attend to all tokens and all tokens attend to them.

Two ways in: ``visattn.apply(model, "bra", n_win=..., topk=...)`` swaps the class of a built
model's attention layers in place; ``timm.create_model(name, attn_layer="visattn_bra")`` (after
``import visattn``) or ``attn_layer=visattn.timm.bra(n_win=8, topk=4)`` builds it. Either way the
parameter names are timm's, so checkpoints load unchanged (``lepe=True`` adds ``attn.lepe.*``).

EVA-style attention (rotary embeddings inside the layer: EVA02, DINOv3, PE, the RoPE ViTs) keeps
its class: its SDPA call, made with the rotated q and k, is answered with routed attention
(``lepe=True`` is refused there). BEiT's relative position bias is refused.

Regions of >= 64 tokens run on the block-sparse kernel (:mod:`visattn.kernels.block_sparse`, one
kv block per region, nothing gathered); smaller ones gather their routed regions' keys and values
and run fused SDPA. Options: ``n_win`` (7), ``topk`` (4; identity: ``n_win ** 2``, which runs timm's
own dense attention), ``lepe`` (False), ``layers`` (None = all), ``strict`` (False: raise instead of
falling back to the PyTorch reference when the kernel cannot run). Attention masks and attention
dropout are not supported on the routed path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache, partial
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.routing import TileOrder, block_scores, select_topk, take_tokens, tile_order
from ..errors import OptionError, ShapeError
from ..frameworks import Target
from ..frameworks.base import PerThread, adapter, constant, select_layers
from ..kernels import block_sparse_attention
from ..options import bool_option, int_option, layers_option, validate_options
from ..patching import Handle, Patcher
from ..registry import Method, register

#: regions of at least this many tokens use the block-sparse kernel; smaller ones the gather path.
KERNEL_MIN_REGION = 64


@constant
def _region_order(grid: tuple[int, int], n_win: int, device: str) -> TileOrder:
    return tile_order(grid, (grid[0] // n_win, grid[1] // n_win), device=device)


@constant
def _token_order(grid: tuple[int, int], n_win: int, num_prefix: int, device: str) -> tuple[Tensor, Tensor]:
    """The permutation of ``[prefix, grid in raster order]`` tokens into region order with the prefix last
    (region ``r`` is token block ``r``, the prefix the last block(s)), and its inverse. The kernel reads the
    tokens in that order in place; the gather path moves them (one
    :func:`~visattn.core.routing.take_tokens` each way)."""
    order = _region_order(grid, n_win, device)
    perm = torch.cat([order.perm + num_prefix, torch.arange(num_prefix, device=device)])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    return perm.to(torch.int32), inverse.to(torch.int32)  # int32: as the kernel reads it


def check_grid(grid: tuple[int, int], n_win: int) -> None:
    """Raise :class:`ShapeError` unless ``n_win`` divides both sides of the grid."""
    if grid[0] % n_win or grid[1] % n_win:
        fits = [n for n in range(1, min(grid) + 1) if grid[0] % n == 0 and grid[1] % n == 0]
        raise ShapeError(f"bra: n_win={n_win} does not divide the {grid[0]}x{grid[1]} patch grid; "
                         f"n_win values that fit: {fits}")


def check_topk(n_win: int, topk: int) -> None:
    """Raise :class:`OptionError` unless ``topk`` is at most the number of regions."""
    if topk > n_win ** 2:
        raise OptionError(f"bra: topk must be <= n_win ** 2 = {n_win ** 2} (got {topk})")


def bi_level_routing_attention(q: Tensor, k: Tensor, v: Tensor, *, num_prefix: int, grid: tuple[int, int],
                               n_win: int, topk: int, scale: float, strict: bool = False, path: str = "auto",
                               on_routes: Callable[[Tensor], None] | None = None) -> Tensor:
    """Eqs. 3-6 of BiFormer on ``[B, H, P + h*w, D]`` tensors (prefix first, grid in raster order).

    ``path``: ``"kernel"`` (block-sparse kernel), ``"gather"`` (gather routed regions, then SDPA), or
    ``"auto"``: the kernel for regions of at least ``KERNEL_MIN_REGION`` tokens. ``on_routes``, when given,
    receives the routes ``[B, n_win ** 2, topk]`` (region indices, in the order top-k gave them), in eager
    mode only (inside a ``torch.compile``d graph it would add a graph break).
    """
    check_grid(grid, n_win)
    if path not in ("auto", "kernel", "gather"):
        raise OptionError(f"bra: path must be one of 'auto', 'kernel', 'gather' (got {path!r})")
    p = num_prefix
    size = (grid[0] // n_win) * (grid[1] // n_win)
    perm, inverse = _token_order(grid, n_win, p, str(q.device))
    routed = _route(q, k, p, grid, n_win, topk)
    if on_routes is not None:
        on_routes(routed[:, 0])
    if path == "kernel" or (path == "auto" and size >= KERNEL_MIN_REGION):  # reads the tokens in region order
        return _routed_kernel(q, k, v, routed, perm, p=p, size=size, scale=scale, strict=strict)
    qs, ks, vs = (take_tokens(t, perm) for t in (q, k, v))
    return take_tokens(_routed_gather(qs, ks, vs, routed, p=p, size=size, scale=scale), inverse)


@constant
def _region_members(grid: tuple[int, int], n_win: int, device: str, dtype: torch.dtype) -> Tensor:
    """``[R, h * w]``: 1 where a grid token (raster order) lies in region ``r`` (regions in raster order)."""
    order = _region_order(grid, n_win, device)
    regions, size = n_win * n_win, order.perm.numel() // (n_win * n_win)
    members = torch.zeros(regions, order.perm.numel(), dtype=dtype, device=device)
    members[torch.arange(regions, device=device).repeat_interleave(size), order.perm] = 1
    return members


@torch.no_grad()
def _route(q: Tensor, k: Tensor, num_prefix: int, grid: tuple[int, int], n_win: int, topk: int) -> Tensor:
    """Eqs. 3-5, shared by all heads, on ``[B, H, P + h*w, D]`` q and k: ``[B, 1, R, topk]`` routed regions.

    The region means come from one product with the membership matrix, over the tokens where they lie
    (a strided view of the projection's output needs no copy)."""
    b, h, _, d = q.shape
    members = _region_members(grid, n_win, str(q.device), q.dtype)
    size = members.shape[1] // members.shape[0]
    q_r, k_r = (torch.matmul(members, t[:, :, num_prefix:].transpose(1, 2).flatten(2)).div_(size).unsqueeze(1)
                for t in (q, k))
    return select_topk(block_scores(q_r, k_r), topk)[0]


def route_regions(q: Tensor, k: Tensor, *, num_prefix: int, grid: tuple[int, int], n_win: int, topk: int) -> Tensor:
    """The regions BRA routes each region to (Eqs. 3-5), from one layer's ``[B, H, P + h*w, D]`` q and k.

    Returns ``[B, n_win ** 2, topk]`` region indices, ascending; regions are numbered in raster order of
    the ``n_win x n_win`` region grid.
    """
    check_grid(grid, n_win)
    check_topk(n_win, topk)
    return _route(q, k, num_prefix, grid, n_win, topk)[:, 0].sort(dim=-1).values


@constant
def _counts(batch: int, regions: int, topk: int, device: str) -> Tensor:
    return torch.full((batch, 1, regions), topk, dtype=torch.int32, device=device)


def _routed_kernel(q: Tensor, k: Tensor, v: Tensor, routed: Tensor, order: Tensor, *, p: int, size: int,
                   scale: float, strict: bool) -> Tensor:
    """The kernel over the tokens taken in region ``order`` (region ``r`` is block ``r``, the prefix last)."""
    b, regions, topk = q.shape[0], routed.shape[2], routed.shape[3]
    if p == 0:  # the routed regions are the lists, all of one length
        counts = _counts(b, regions, topk, str(q.device))
        return block_sparse_attention(q, k, v, routed, counts, block_q=size, block_k=size, scale=scale,
                                      order=order, strict=strict, check_values=False)
    n_blocks = regions + -(-p // size)  # the prefix tokens' (partial) blocks follow the regions
    every = torch.arange(n_blocks, device=q.device, dtype=torch.int32)
    kv_indices = every.expand(b, 1, n_blocks, n_blocks).clone()  # prefix query blocks visit every block
    kv_indices[:, :, :regions, :topk] = routed  # a region visits its routed regions and the prefix blocks
    kv_indices[:, :, :regions, topk:topk + n_blocks - regions] = every[regions:]
    kv_counts = torch.full((b, 1, n_blocks), n_blocks, dtype=torch.int32, device=q.device)
    kv_counts[:, :, :regions] = topk + n_blocks - regions
    return block_sparse_attention(q, k, v, kv_indices, kv_counts, block_q=size, block_k=size, scale=scale,
                                  order=order, strict=strict, check_values=False)


def _routed_gather(qs: Tensor, ks: Tensor, vs: Tensor, routed: Tensor, *, p: int, size: int, scale: float) -> Tensor:
    b, h, _, d = qs.shape
    regions, topk = routed.shape[2], routed.shape[3]
    g = regions * size
    index = routed[:, 0].long().reshape(b, 1, regions * topk, 1, 1).expand(b, h, regions * topk, size, d)

    def gather(t: Tensor) -> Tensor:
        picked = t[:, :, :g].reshape(b, h, regions, size, d).gather(2, index).reshape(b, h, regions, topk * size, d)
        prefix = t[:, :, g:].unsqueeze(2).expand(b, h, regions, p, d)
        return torch.cat([picked, prefix], dim=3)

    out_grid = F.scaled_dot_product_attention(qs[:, :, :g].reshape(b, h, regions, size, d), gather(ks), gather(vs),
                                              scale=scale).reshape(b, h, g, d)
    out_prefix = F.scaled_dot_product_attention(qs[:, :, g:], ks, vs, scale=scale)
    return torch.cat([out_grid, out_prefix], dim=2)


@cache
def timm_layer() -> type:
    """``BiLevelRoutingAttention``: timm's ``Attention`` with bi-level routing (built on first use, so
    visattn imports without timm)."""
    from timm.layers import Attention

    class BiLevelRoutingAttention(Attention):
        """timm ``Attention`` whose token mixing is bi-level routing attention (same parameters and names).

        Configured through class attributes (:func:`visattn.timm.bra` makes configured subclasses) or,
        on models patched by ``visattn.apply``, instance attributes set by the patcher.
        """

        n_win: ClassVar[int] = 7
        topk: ClassVar[int] = 4
        use_lepe: ClassVar[bool] = False
        strict: ClassVar[bool] = False
        #: prefix tokens (class, registers); ``None``: whatever a square grid leaves over.
        num_prefix_tokens: ClassVar[int | None] = None

        def __init__(self, dim: int, num_heads: int = 8, **kwargs: Any) -> None:
            super().__init__(dim, num_heads=num_heads, **kwargs)
            if self.use_lepe:
                self.lepe = _make_lepe(self.attn_dim, device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)

        def _layout(self, n: int) -> tuple[int, tuple[int, int]]:
            layouts = self.__dict__.get("_visattn_layout")  # set per call (and thread) by visattn.apply's model hook
            layout = None if layouts is None else layouts.get()
            if layout and layout["num_tokens"] == n:
                return layout["num_prefix"], layout["grid"]
            p = self.num_prefix_tokens
            side = math.isqrt(n - (p or 0))
            if p is None:
                p = n - side * side
            if side * side != n - p:
                raise ShapeError(f"bra: {n} tokens with {p} prefix tokens do not form a square grid; build the model "
                                 f"with visattn.apply(model, 'bra', ...) for non-square inputs")
            return p, (side, side)

        def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            if self.topk >= self.n_win ** 2 and not self.use_lepe:
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # identity: timm's dense path
            if attn_mask is not None or is_causal:
                raise ShapeError("bra: attention masks and causal attention are not supported with routing")
            b, n, _ = x.shape
            prefix, grid = self._layout(n)
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            out = bi_level_routing_attention(q, k, v, num_prefix=prefix, grid=grid, n_win=self.n_win, topk=self.topk,
                                             scale=self.scale, strict=self.strict,
                                             on_routes=None if torch.compiler.is_compiling()  # no graph break
                                             else self.__dict__.get("_visattn_on_routes"))
            x = out.transpose(1, 2).reshape(b, n, self.attn_dim)  # the kernel's output is laid out so: no copy
            # LePE's input, v's grid tokens as [B, h * w, C], copied out of the qkv activation so that the whole
            # activation goes before the conv and the projection (eager peak memory)
            v_grid = None
            if self.use_lepe:
                v_grid = v[:, :, prefix:].transpose(1, 2).reshape(b, -1, self.attn_dim).contiguous()
            del q, k, v, out
            if v_grid is not None:  # LCE(V) as channels-last [B, C, h, w], back as [B, h * w, C] without copies
                lce = self.lepe(v_grid.unflatten(1, grid).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape_as(v_grid)
                del v_grid
                if x.requires_grad or lce.requires_grad:
                    x = x + lce if prefix == 0 else torch.cat([x[:, :prefix], x[:, prefix:] + lce], dim=1)
                else:  # inference: into the attention output, no further [B, N, C] buffer
                    x[:, prefix:] += lce
                del lce
            x = self.norm(x)
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    return BiLevelRoutingAttention


def _make_lepe(channels: int, **dd: Any) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 5, padding=2, groups=channels, **dd)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


@cache
def _configured(n_win: int, topk: int, lepe: bool, strict: bool, num_prefix_tokens: int | None
                ) -> type:
    attrs = dict(n_win=n_win, topk=topk, use_lepe=lepe, strict=strict, num_prefix_tokens=num_prefix_tokens,
                 __module__=__name__)
    return type(f"BiLevelRoutingAttention_w{n_win}_k{topk}{'_lepe' if lepe else ''}", (timm_layer(),), attrs)


@register
class BRA(Method):
    name = "bra"
    summary = "bi-level routing attention: each region attends to its top-k regions"
    paper = "Zhu et al., BiFormer: Vision Transformer with Bi-Level Routing Attention, CVPR 2023 (Eqs. 3-7)"
    frameworks = ("timm",)
    # models whose attention layers all see one patch grid (PiT's stages pool it, so one n_win cannot fit them all)
    families = {"timm": ("VisionTransformer", "VisionTransformerDistilled", "Eva", "NaFlexVit")}
    options = (
        int_option("n_win", 7, low=1, doc="regions per side of the patch grid"),
        int_option("topk", 4, low=1, doc="regions each region attends to (identity: n_win ** 2)"),
        bool_option("lepe", False, identity=False, doc="add LePE (zero-initialised depthwise 5x5 conv on v)"),
        layers_option("layers", None, doc="attention layers to patch (None = all)"),
        bool_option("strict", False, doc="raise instead of falling back to the PyTorch reference"),
    )

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        if target.framework == "timm":  # BEiT: refused with the reason, before the family list
            adapter("timm").projected_attention(target.model, self.name)
        super().check_target(target, options)
        check_topk(options["n_win"], options["topk"])
        timm_fw = adapter("timm")
        layers = timm_fw.attention_layers(target.model)
        chosen = select_layers([n for n, _ in layers], options["layers"], self.name)
        if options["lepe"] and any(isinstance(layers[i][1], timm_fw.ROTARY) for i in chosen):
            raise OptionError("bra: lepe=True needs timm.layers.Attention layers (it adds a convolution on v inside "
                              "the layer); on the rotary attention of EVA-style models only lepe=False routes")
        if not getattr(target.model, "dynamic_img_size", False) and not timm_fw.naflex(target.model):
            check_grid(timm_fw.vit_grid(target.model), options["n_win"])

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> Handle:
        model, timm_fw = target.model, adapter("timm")
        modules = timm_fw.attention_layers(model)
        layers = select_layers([n for n, _ in modules], options["layers"], self.name)
        cls = _configured(options["n_win"], options["topk"], options["lepe"], options["strict"],
                          int(getattr(model, "num_prefix_tokens", 0)))
        layouts: PerThread[dict[str, Any]] = PerThread(dict)
        handle = BraHandle(self.name, model, options, patcher)

        def configure(idx: int, module: nn.Module) -> dict[str, Any]:
            if options["lepe"]:
                weight = module.qkv.weight
                patcher.add_module(module, "lepe", _make_lepe(module.attn_dim, device=weight.device,
                                                              dtype=weight.dtype))
            return {"_visattn_layout": layouts, "_visattn_on_routes": partial(handle.record, idx)}

        rotary = [i for i in layers if isinstance(modules[i][1], timm_fw.ROTARY)]
        plain = [i for i in layers if i not in rotary]
        timm_fw.swap_attention(model, patcher, plain, lambda idx, module: _swapped(type(module), cls), configure)
        if rotary and options["topk"] < options["n_win"] ** 2:  # identity: timm's own attention
            timm_fw.answer_sdpa(model, patcher, rotary, partial(_routed_sdpa, options, layouts, handle), "route")

        def set_layout(images: Tensor) -> None:
            grid = timm_fw.vit_grid(model, images.shape[-2:])
            check_grid(grid, options["n_win"])
            layouts.set(dict(num_prefix=model.num_prefix_tokens, grid=grid,
                             num_tokens=model.num_prefix_tokens + grid[0] * grid[1]))

        timm_fw.on_images(model, patcher, set_layout, self.name)
        return handle


def _routed_sdpa(options: dict[str, Any], layouts: PerThread[dict[str, Any]], handle: BraHandle, layer: int,
                 call: dict[str, Any]) -> Tensor:
    """The SDPA call of a rotary (EVA-style) attention layer answered by routed attention: q and k arrive rotated,
    k and v with as many heads as q (timm repeats grouped keys first)."""
    q, k, v = call["query"], call["key"], call["value"]
    if call.get("attn_mask") is not None or call.get("is_causal") or call.get("dropout_p", 0.0) > 0:
        raise ShapeError("bra: attention masks, causal attention and attention dropout are not supported with "
                         "routing (call model.eval() for inference)")
    layout = layouts.get()
    if layout.get("num_tokens") != q.shape[-2]:
        raise ShapeError(f"bra: attention layer {layer} got {q.shape[-2]} tokens, the image gives "
                         f"{layout.get('num_tokens')}")
    scale = call.get("scale")
    return bi_level_routing_attention(q, k, v, num_prefix=layout["num_prefix"], grid=layout["grid"],
                                      n_win=options["n_win"], topk=options["topk"],
                                      scale=q.shape[-1] ** -0.5 if scale is None else scale, strict=options["strict"],
                                      on_routes=None if torch.compiler.is_compiling() else partial(handle.record,
                                                                                                   layer))


class BraHandle(Handle):
    """Handle of ``bra``. ``routes[layer]``: the regions each region of that attention layer attended to in
    the last forward, ``[B, n_win ** 2, topk]`` ascending (as :func:`route_regions` gives them; regions in
    raster order of the ``n_win x n_win`` grid). Layers at the identity setting run dense and record none, and
    so does a ``torch.compile``d forward. Each thread records its own forwards: read in a thread that ran none,
    ``routes`` are another thread's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # as routing left them; sorted when read, off the forward's path
        self._routes: PerThread[dict[int, Tensor]] = PerThread(dict)

    def record(self, layer: int, routed: Tensor) -> None:
        """Keep ``layer``'s routes of the running forward (this thread's)."""
        self._routes.get()[layer] = routed

    @property
    def routes(self) -> dict[int, Tensor]:
        return {layer: routed.sort(dim=-1).values for layer, routed in self._routes.latest().items()}


@cache
def _swapped(base: type, configured: type) -> type:
    """A class that is ``configured`` (BRA behaviour) for a module of class ``base`` (timm's Attention)."""
    from timm.layers import Attention

    if base is Attention:
        return configured
    return type(f"{configured.__name__}_{base.__name__}", (configured, base), {"__module__": __name__})


def bra(*, n_win: int = 7, topk: int = 4, lepe: bool = False, strict: bool = False,
        num_prefix_tokens: int | None = None) -> type:
    """A configured layer class for timm's factory flag: ``create_model(name, attn_layer=bra(n_win=8, topk=4))``.

    ``num_prefix_tokens=None`` infers the prefix from a square grid; give it for models whose prefix
    is larger than a grid side.
    """
    values = validate_options("bra", BRA.options, dict(n_win=n_win, topk=topk, lepe=lepe, strict=strict))
    check_topk(n_win, topk)
    if num_prefix_tokens is not None and (not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0):
        raise OptionError(f"bra: num_prefix_tokens must be None or an int >= 0 (got {num_prefix_tokens!r})")
    return _configured(values["n_win"], values["topk"], values["lepe"], values["strict"], num_prefix_tokens)

