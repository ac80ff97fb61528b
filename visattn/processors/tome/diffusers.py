"""diffusers adapter of ``tome``: ToMe for Stable Diffusion (Bolya & Hoffman, 2023, "Token Merging for
Fast Stable Diffusion") on UNets, SDXL's included, and DiTs (PixArt, DiT, SD3, Flux).

The math is :mod:`visattn.core.merge_sd`: one random destination per ``sy x sx`` cell of the image
grid, every source matched to its most similar destination (cosine similarity of the hidden
states), the ``r = ratio * N`` most similar sources averaged into their destination, and the
output copied back to every token afterwards. Text tokens are never merged: a UNet's and PixArt's
blocks see image tokens only, SD3's joint blocks keep the text in ``encoder_hidden_states``, and
Flux's single-stream attention gets its text first (the image tokens after it are merged).

Two scopes, both run by :class:`TomeAttnProcessor` (the stock processors keep running inside it; block scope
adds forward hooks on the blocks) and undone exactly by ``remove()``:

- ``scope="attention"`` (what tomesd does): the input of each self-attention (UNet and PixArt
  ``attn1``; SD3 ``attn`` and ``attn2``; Flux ``attn``) is merged, the attention runs on ``N - r``
  image tokens, and its output is unmerged: ``y_i = Attn(merge(x))_{G(i)}``.
- ``scope="block"``: the whole transformer block (self-attention, cross- or joint attention and MLP)
  runs on the merged tokens and only its residual update is unmerged, so each token keeps its own
  residual stream: ``y_i = x_i + (Block(merge(x)) - merge(x))_{G(i)}``.

Flux's rotary position tables are per token: a merged sequence takes, in every slot, the position
of the token that stands there (a destination or a kept source; ``CellMerge.select``), which
differs per sample, so merged Flux attention layers get :class:`PerSampleRopeFluxAttnProcessor`,
diffusers' Flux processor with per-sample tables (it defers to the stock processor otherwise).

Options and identity values: ``ratio`` (0.5; identity 0: nothing is merged and the output is
bit-identical to stock), ``max_downsample`` (None: the finest resolution that has self-attention,
tomesd's default of 1 on SD 1.x/2.x, 2 on SDXL, whose attention runs at 1/2 and 1/4 of the latent
size; 1, 2, 4 or 8: merge at every UNet level downsampled at most that much; DiTs have one level,
1), ``sx`` and ``sy`` (2: the cell size), ``seed`` (0: with the call's timestep, the key of the
destinations' pseudo-random positions: each denoising step gets fresh ones, as in tomesd, the layers of
one call at one resolution share them, and a generation run again gets the same; they are hashed on the
device, so compiled and CUDA-graph runs draw them too), ``scope``
("attention"). ``tome`` declares these beside its timm/open_clip options, each scoped to its
frameworks: an option of the other frameworks, given, is an error (:func:`visattn.options.check_scope`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ...core.merge_sd import CellMerge, cell_destinations, match_to_cells
from ...errors import OptionError, ShapeError, UnsupportedModelError
from ...frameworks import Target
from ...frameworks.base import PerThread, adapter, memo
from ...frameworks.diffusers_layers import LayerProcessor, StockLayer
from ...options import Option, choice_option, float_option, int_option, validate_options
from ...patching import Handle, Patcher

FAMILIES = ("UNet2DConditionModel", "PixArtTransformer2DModel", "DiTTransformer2DModel", "SD3Transformer2DModel",
            "FluxTransformer2DModel")
DOWNSAMPLES = (1, 2, 4, 8)


def _check_max_downsample(v: Any) -> int | None:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v in DOWNSAMPLES):
        return v
    raise ValueError


_DIFFUSERS = ("diffusers",)
OPTIONS = tuple(o.scoped(frameworks=_DIFFUSERS) for o in (
    float_option("ratio", 0.5, low=0.0, high=1.0, high_open=True, identity=0.0,
                 doc="diffusers: share of a layer's image tokens merged away (r = ratio * N)"),
    int_option("sx", 2, low=1, doc="diffusers: cell width, one destination per sy x sx cell"),
    int_option("sy", 2, low=1, doc="diffusers: cell height, one destination per sy x sx cell"),
    int_option("seed", 0, low=0,
               doc="diffusers: with each call's timestep, the key of the destinations' positions in their cells"),
    choice_option("scope", "attention", ("attention", "block"),
                  doc="diffusers: merge around each self-attention, or around each whole transformer block"),
    Option("max_downsample", None, "None or one of 1, 2, 4, 8", _check_max_downsample,
           doc="diffusers: merge at UNet levels downsampled at most this much (None: the finest with attention)"),
))


class _Site:
    """A transformer block the method patches: its kind, its self-attention layers and its level."""

    def __init__(self, name: str, block: nn.Module, kind: str, attentions: list[tuple[int, nn.Module]],
                 downsample: int) -> None:
        self.name = name
        self.block = block
        self.kind = kind  # "basic" (UNet, PixArt), "joint" (SD3), "flux", "flux_single"
        self.attentions = attentions  # (index in attention_layers, module)
        self.downsample = downsample


def _sites(model: nn.Module) -> list[_Site]:
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from ...frameworks.diffusers import attention_layers, layer_grid

    index = {id(m): i for i, (_, m) in enumerate(attention_layers(model))}
    kinds = ((BasicTransformerBlock, "basic", ("attn1",)), (JointTransformerBlock, "joint", ("attn", "attn2")),
             (FluxTransformerBlock, "flux", ("attn",)), (FluxSingleTransformerBlock, "flux_single", ("attn",)))
    probe = (1024, 1024)  # a grid divisible by every UNet level: the layout's grid gives the downsampling
    sites = []
    for name, block in model.named_modules():
        for cls, kind, attrs in kinds:
            if type(block) is cls:
                attns = [(index[id(a)], a) for a in (getattr(block, x, None) for x in attrs)
                         if a is not None and not getattr(a, "is_cross_attention", False)]
                if attns:
                    grid = layer_grid(model, attns[0][0], probe)
                    sites.append(_Site(name, block, kind, attns, probe[0] // grid[0]))
    return sites


def _selected(sites: list[_Site], max_downsample: int | None) -> list[_Site]:
    levels = sorted({s.downsample for s in sites})
    limit = levels[0] if max_downsample is None else max_downsample
    return [s for s in sites if s.downsample <= limit]


def check(target: Target, options: dict[str, Any]) -> list[_Site]:
    """Errors that depend on the model: a ``max_downsample`` that selects no layer; returns the selected sites."""
    sites = _sites(target.model)
    if not sites:
        raise OptionError(f"tome: this {target.family} has no transformer block with self-attention to merge in")
    if options["ratio"] > 0 and not _selected(sites, options["max_downsample"]):
        levels = ", ".join(str(d) for d in sorted({s.downsample for s in sites}))
        raise OptionError(f"tome: max_downsample={options['max_downsample']} selects no layer of this "
                          f"{target.family}: its self-attention runs at downsampling {levels}; choose "
                          f"max_downsample >= {min(s.downsample for s in sites)} or None")
    return _selected(sites, options["max_downsample"])


class TomeDiffusersHandle(Handle):
    """Handle of ``tome`` on a diffusers model.

    ``token_counts``: for the last denoiser call (this thread's; read in a thread that ran none, another
    thread's), one ``(name, tokens in, tokens after merging)`` per merge, in execution order (``name`` the
    merged attention layer or block).
    """

    def __init__(self, *args: Any, state: _State, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = state

    @property
    def token_counts(self) -> list[tuple[str, int, int]]:
        return list(self._state.calls.latest().token_counts)


class _Call:
    """What one denoiser call carries to the hooks: its grid and text length, the key of its destinations,
    the merges of each layer (pending until the layer's output is unmerged), the destinations per grid size,
    the counts."""

    def __init__(self, grid: tuple[int, ...] = (), text_tokens: int = 0, key: Tensor | int = 0) -> None:
        self.grid = grid
        self.text_tokens = text_tokens
        self.key = key
        self.token_counts: list[tuple[str, int, int]] = []
        self.partitions: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.pending: dict[str, list[Any]] = {}


class _State:
    """The method on one model: its options and the current call of each thread."""

    def __init__(self, model: nn.Module, options: dict[str, Any]) -> None:
        self.model = model
        self.ratio: float = options["ratio"]
        self.sx: int = options["sx"]
        self.sy: int = options["sy"]
        self.calls: PerThread[_Call] = PerThread(_Call)
        self._layouts: dict[tuple, tuple[int, ...]] = {}

    def layer_grid(self, layer: int) -> tuple[int, ...]:
        from ...frameworks.diffusers import layer_grid

        call = self.calls.get()
        return memo(self._layouts, (layer, call.grid), lambda: layer_grid(self.model, layer, call.grid))

    def decide(self, name: str, metric: Tensor, grid: tuple[int, ...]) -> CellMerge:
        h, w = grid
        n = metric.shape[1]
        if n != h * w:
            raise ShapeError(f"tome: {name} got {n} image tokens, expected a {h}x{w} grid")
        r = int(n * self.ratio)
        call = self.calls.get()
        if r == 0 or h < self.sy or w < self.sx:
            merge = CellMerge(None, n)
        else:
            device = metric.device
            if (h, w, device) not in call.partitions:  # one partition per denoiser call and grid size
                call.partitions[h, w, device] = cell_destinations(h, w, self.sx, self.sy, call.key, device=device)
            dst, src = call.partitions[h, w, device]
            merge = match_to_cells(metric, dst, src, r)
        call.token_counts.append((name, n, n - merge.r))
        return merge

    def pending(self, name: str) -> list[Any]:
        """The merges of ``name`` that the running call has not unmerged yet (innermost last)."""
        return self.calls.get().pending.setdefault(name, [])


def destination_key(seed: int, inputs: dict[str, Any]) -> Tensor | int:
    """The key of a denoiser call's destinations (:func:`~visattn.core.merge_sd.cell_destinations`): ``seed``
    and the call's timestep (its first, in thousandths), on the timestep's device; ``seed`` alone without one."""
    timestep = inputs.get("timestep")
    if timestep is None:
        return seed
    t = torch.as_tensor(timestep).flatten()[0].float()
    return (t * 1000).round().long() + seed * 1_000_003


def _merge_rope(rope: tuple[Tensor, Tensor] | None, merge: CellMerge,
                n_img: int) -> tuple[Tensor, Tensor] | None:
    """Flux's rotary tables ``[T + N, D]`` for the merged sequence: ``[B, T + N - r, D]`` per sample."""
    if rope is None or merge.r == 0:
        return rope
    batch = merge.slot.shape[0]
    text = rope[0].shape[0] - n_img

    def one(table: Tensor) -> Tensor:
        table = table[None].expand(batch, -1, -1)
        return torch.cat([table[:, :text], merge.select(table[:, text:])], dim=1)

    return one(rope[0]), one(rope[1])


def _hidden(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict[str, Any], x: Tensor) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _check_no_mask(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("attention_mask") is not None:
        raise ShapeError(f"tome: {name} was given an attention mask over its tokens, which merged tokens "
                         f"cannot follow; call it without attention_mask or use ratio=0")


def _attention_merge(state: _State, site: _Site, layer: int, name: str) -> tuple[Callable, Callable]:
    """``scope="attention"``: ``before(args, kwargs)`` merges the self-attention's image tokens (and Flux's rotary
    tables) in its call, ``after(output)`` unmerges its output."""

    def before(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        _check_no_mask(name, kwargs)
        x = _hidden(args, kwargs)
        start = state.calls.get().text_tokens if site.kind == "flux_single" else 0  # Flux single stream: text first
        image = x[:, start:]
        merge = state.decide(name, image, state.layer_grid(layer))
        state.pending(name).append((merge, start))
        if merge.r == 0:
            return args, kwargs
        merged = merge.merge(image)
        args, kwargs = _with_hidden(args, kwargs, torch.cat([x[:, :start], merged], dim=1) if start else merged)
        if "image_rotary_emb" in kwargs:
            kwargs["image_rotary_emb"] = _merge_rope(kwargs["image_rotary_emb"], merge, image.shape[1])
        return args, kwargs

    def after(output: Any) -> Any:
        merge, start = state.pending(name).pop()
        if merge.r == 0:
            return output
        first = output[0] if isinstance(output, tuple) else output
        first = merge.unmerge(first) if not start else torch.cat([first[:, :start], merge.unmerge(first[:, start:])], 1)
        return (first, *output[1:]) if isinstance(output, tuple) else first

    return before, after


def _hook_block(patcher: Patcher, state: _State, site: _Site, active: Callable[[], bool]) -> None:
    """``scope="block"``: the block runs on merged tokens; its residual update is unmerged (while ``active()``:
    the block's attention runs the processor that installed this)."""
    layer = site.attentions[0][0]

    def before(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not active():
            return None
        _check_no_mask(site.name, kwargs)
        x = _hidden(args, kwargs)  # image tokens only, in every supported block
        merge = state.decide(site.name, x, state.layer_grid(layer))
        merged = merge.merge(x)
        state.pending(site.name).append((merge, x, merged))
        if merge.r == 0:
            return args, kwargs
        args, kwargs = _with_hidden(args, kwargs, merged)
        if "image_rotary_emb" in kwargs:
            kwargs["image_rotary_emb"] = _merge_rope(kwargs["image_rotary_emb"], merge, x.shape[1])
        return args, kwargs

    def after(output: Any) -> Any:
        pending = state.pending(site.name)
        if not pending:  # the block ran while inactive
            return output
        merge, x, merged = pending.pop()
        if merge.r == 0:
            return output
        if isinstance(output, tuple):  # SD3 and Flux blocks: (encoder_hidden_states, hidden_states)
            return output[0], x + merge.unmerge(output[1] - merged)
        return x + merge.unmerge(output - merged)

    adapter("diffusers").around_call(site.block, patcher, before, after)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` ``[B, S, H, D]`` with per-sample tables ``[B, S, D]`` (Flux's pairing)."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos[:, :, None] + rotated.float() * sin[:, :, None]).to(x.dtype)


class PerSampleRopeFluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` for rotary tables given per sample (``[B, S, D]``), as merged
    sequences need; with shared tables (``[S, D]``) or none it calls the stock processor it replaces."""

    def __init__(self, stock: Callable[..., Any]) -> None:
        self.stock = stock

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if image_rotary_emb is None or image_rotary_emb[0].dim() == 2:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        from ...frameworks.diffusers import flux_joint_output, flux_joint_qkv

        q, k, v = flux_joint_qkv(attn, hidden_states, encoder_hidden_states)
        cos, sin = image_rotary_emb
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask,
                                    backend=getattr(self.stock, "_attention_backend", None))
        return flux_joint_output(attn, out.flatten(2, 3).to(q.dtype), hidden_states, encoder_hidden_states)


class TomeAttnProcessor(LayerProcessor):
    """ToMe-SD (module doc) as a diffusers attention processor made for ``model`` (one of :data:`FAMILIES`).

    ``model.set_attn_processor(p := TomeAttnProcessor(model, ratio=0.5, scope="block"))`` merges as
    ``visattn.apply(model, "tome", ratio=0.5, scope="block")`` does (which installs this very processor);
    ``p.token_counts`` is the handle's. ``model.set_attn_processor(p.stock_processors)`` gives stock outputs
    again (block scope merges only around blocks whose attention runs ``p``) and ``p.detach()`` removes the
    hooks: the model's, which read each call's grid, and the blocks'. Options: those of ``tome`` on diffusers.
    """

    method = "tome"

    def __init__(self, model: nn.Module, *, patcher: Patcher | None = None, **options: Any) -> None:
        from ...frameworks import detect

        self.options = validate_options("tome", OPTIONS, options)
        target = detect(model)
        if target.family not in FAMILIES:
            raise UnsupportedModelError(f"tome does not support the diffusers model {target.family}; supported: "
                                        f"{', '.join(FAMILIES)}")
        self._sites = check(target, self.options)
        super().__init__(model, patcher)

    def setup(self) -> None:
        from ...frameworks.diffusers import call_grid, on_call

        model, options = self._model, self.options
        self.state = _State(model, options)
        def start(inputs: dict[str, Any]) -> None:
            self.state.calls.set(_Call(*call_grid(model, inputs), destination_key(options["seed"], inputs)))

        on_call(model, self._patcher, start)
        self._merges: dict[int, tuple[Callable, Callable]] = {}
        self.layers: set[int] = set()  # the attention layers this processor serves
        for site in self._sites:
            self.layers.update(layer for layer, _ in site.attentions)
            if options["scope"] == "block":
                first = site.attentions[0][1]
                _hook_block(self._patcher, self.state, site, lambda first=first: first.processor is self)
            else:
                for layer, attn in site.attentions:
                    name = f"{site.name}.{_child_name(site.block, attn)}"
                    self._merges[layer] = _attention_merge(self.state, site, layer, name)
        # merged Flux sequences take their rotary tables per sample
        per_sample_rope = type(model).__name__ == "FluxTransformer2DModel" and options["ratio"] > 0
        self._served = {layer.index: PerSampleRopeFluxAttnProcessor(layer.stock) if per_sample_rope else layer.stock
                        for layer in self._layers.values() if layer.index in self.layers}

    @property
    def token_counts(self) -> list[tuple[str, int, int]]:
        """As :attr:`TomeDiffusersHandle.token_counts`."""
        return list(self.state.calls.latest().token_counts)

    def run(self, layer: StockLayer, attn: nn.Module, hidden_states: Tensor, kwargs: dict[str, Any]) -> Any:
        stock = self._served.get(layer.index)
        if stock is None:
            return layer.stock(attn, hidden_states, **kwargs)
        merge = self._merges.get(layer.index)
        if merge is None:  # block scope: the block's hooks merged already
            return stock(attn, hidden_states, **kwargs)
        before, after = merge
        args, kwargs = before((hidden_states,), kwargs)
        return after(stock(attn, *args, **kwargs))


def install(target: Target, patcher: Patcher, options: dict[str, Any]) -> TomeDiffusersHandle:
    """Patch ``target.model`` (one of :data:`FAMILIES`): :class:`TomeAttnProcessor` on the layers it serves."""
    from ...frameworks.diffusers import set_processors

    processor = TomeAttnProcessor(target.model, patcher=patcher, **{o.name: options[o.name] for o in OPTIONS})
    set_processors(target.model, patcher, lambda i, name, m: processor if i in processor.layers else None)
    return TomeDiffusersHandle("tome", target.model, options, patcher, state=processor.state)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(n for n, m in parent.named_children() if m is child)
