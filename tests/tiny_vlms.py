"""Tiny random-weight vision-language models shared by the transformers tests (built from configs).

LLaVA, LLaVA-NeXT, LLaVA-OneVision, PaliGemma, Idefics3 (SmolVLM), InternVL, Qwen2-VL, Qwen2.5-VL and Qwen3-VL, with
:func:`vlm_inputs` giving each a batch of two left-padded prompts of different lengths holding image tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)

PAD, IMAGE, START, END, VIDEO = 0, 90, 91, 92, 93
VOCAB = 100
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=PAD)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=14)
QWEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
QWEN_TEXT = dict(TEXT, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})


def prompts(image_tokens: list[int], wrap: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts of different lengths, sample b holding image_tokens[b] image tokens."""
    rows = [[5, 6, *wrap[:1], *[IMAGE] * n, *wrap[1:], 7, 8, 9, 10] for n in image_tokens]
    rows[0] = rows[0][:-2]  # the first prompt is shorter: more left padding, image tokens further right
    width = max(map(len, rows)) + 1
    ids = torch.full((len(rows), width), PAD)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
    return ids, (ids != PAD).long()


def llava(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
                      pad_token_id=PAD)
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def llava_next(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
                          pad_token_id=PAD, image_grid_pinpoints=[[28, 28], [28, 56]])
    return LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def llava_onevision(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**CLIP), text_config=Qwen2Config(**TEXT),
                               image_token_id=IMAGE, pad_token_id=PAD, image_grid_pinpoints=[[28, 28], [28, 56]],
                               vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    return LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def paligemma(impl: str) -> torch.nn.Module:
    """PaliGemma: SigLIP, a linear projector, Gemma; image and prefix tokens attend to each other both ways."""
    torch.manual_seed(0)
    cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(**CLIP), text_config=GemmaConfig(**TEXT, head_dim=8),
                          image_token_id=IMAGE, pad_token_id=PAD, projection_dim=32)
    return PaliGemmaForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def idefics3(impl: str) -> torch.nn.Module:
    """Idefics3 / SmolVLM: a SigLIP-style tower, pixel shuffle (``scale_factor`` 1: 4 tokens per 28px image), Llama."""
    torch.manual_seed(0)
    cfg = Idefics3Config(vision_config=CLIP, text_config=dict(TEXT, model_type="llama"), image_token_id=IMAGE,
                         scale_factor=1, pad_token_id=PAD)
    return Idefics3ForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def internvl(impl: str) -> torch.nn.Module:
    """InternVL: InternViT, pixel shuffle (``downsample_ratio`` 1 here: 4 tokens per 28px image), Qwen2."""
    torch.manual_seed(0)
    vision = dict(CLIP, image_size=[28, 28], patch_size=[14, 14])
    cfg = InternVLConfig(vision_config=vision, text_config=dict(TEXT, model_type="qwen2"), image_token_id=IMAGE,
                         downsample_ratio=1.0, pad_token_id=PAD)
    return InternVLForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def _qwen_vision(**extra: Any) -> dict[str, Any]:
    return dict(depth=2, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                **extra)


def qwen2_vl(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(text_config=QWEN_TEXT, vision_config=_qwen_vision(embed_dim=32),
                        **QWEN_IDS)
    return Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def qwen2_5_vl(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    vision = _qwen_vision(intermediate_size=64, out_hidden_size=32, window_size=28, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=vision, **QWEN_IDS)
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def qwen3_vl(impl: str) -> torch.nn.Module:
    """Qwen3-VL: its vision tower's layer 0 features also added to the image tokens' hidden states in the first
    decoder layer (DeepStack)."""
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True}
    vision = _qwen_vision(intermediate_size=64, out_hidden_size=32, num_position_embeddings=16,
                          deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=dict(QWEN_TEXT, head_dim=8, rope_parameters=rope), vision_config=vision,
                        **QWEN_IDS)
    return Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation=impl)


def vlm_inputs(family: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    if family == "idefics3":  # images per sample: [B, 1, 3, 28, 28]
        ids, mask = prompts([4, 4])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 1, 3, 28, 28))
    if family in ("llava", "paligemma", "internvl"):
        ids, mask = prompts([4, 4])  # 28px, patch 14 ([CLS] dropped by LLaVA; SigLIP has none): 4 tokens per image
        batch = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28))
        if family == "paligemma":  # the whole prompt is PaliGemma's prefix, as its processor marks it
            batch["token_type_ids"] = torch.zeros_like(ids)
        return batch
    if family in ("llava_next", "llava_onevision"):  # anyres: a 28x28 image (1 crop) and a 28x56 one (2 crops)
        pixels, sizes = torch.randn(2, 3, 3, 28, 28), torch.tensor([[28, 28], [28, 56]])
        cfg = model.config
        with torch.no_grad():
            feats = model.model.get_image_features(pixels, sizes, vision_feature_layer=cfg.vision_feature_layer,
                                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        ids, mask = prompts([len(f) for f in getattr(feats, "pooler_output", feats)])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    # Qwen2-VL / Qwen2.5-VL / Qwen3-VL: flattened 14px patches, grid (1, 4, 4) per 56px image, merged 2x2 -> 4 tokens
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    ids, mask = prompts([4, 4], wrap=(START, END))
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).int(),
                pixel_values=torch.randn(32, 3 * 2 * 14 * 14), image_grid_thw=grid)


BUILDERS = {"llava": llava, "llava_next": llava_next, "llava_onevision": llava_onevision, "paligemma": paligemma,
            "idefics3": idefics3, "internvl": internvl, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl,
            "qwen3_vl": qwen3_vl}


def causal_prompt(model: torch.nn.Module) -> bool:
    """Whether the prompt's tokens attend causally (PaliGemma's prefix attends both ways: a change in the last
    prompt token's attention reaches the earlier tokens in the next layer)."""
    return not isinstance(model, PaliGemmaForConditionalGeneration)


def build(family: str, impl: str) -> torch.nn.Module:
    """The tiny ``family`` model with ``attn_implementation=impl``, in eval mode, set up for greedy generate()."""
    model = BUILDERS[family](impl).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def fresh_static_cache(model: torch.nn.Module) -> None:
    """Let the next generate(cache_implementation="static") make a new static cache: older transformers releases
    (5.6 among them) reuse the previous call's, reset but allocated, which prune refuses (it sizes each layer
    before the prefill allocates it)."""
    model.__dict__.pop("_cache", None)


def generate(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Five greedy tokens, never an image/vision marker token (the tiny models would emit them)."""
    fresh_static_cache(model)
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE, VIDEO, START, END],
                              **kwargs)


def assert_identity(model: torch.nn.Module, batch: dict[str, torch.Tensor], method: str, **options: Any) -> None:
    """``method`` at ``options`` gives bit-identical logits and generate() tokens, and remove() restores them."""
    import visattn

    stock, tokens = forward_logits(model, batch), generate(model, batch)
    visattn.apply(model, method, **options)
    try:
        assert torch.equal(forward_logits(model, batch), stock)
        assert torch.equal(generate(model, batch), tokens)
    finally:
        visattn.remove(model)
    assert torch.equal(forward_logits(model, batch), stock)


def gemma3() -> torch.nn.Module:
    """A tiny Gemma 3: a sliding-window decoder layer (window 4), then two full-attention layers."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention", "full_attention"], pad_token_id=PAD)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=8, patch_size=2)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=GEMMA3_IMAGE,
                       boi_token_index=61, eoi_token_index=62)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


GEMMA3_IMAGE = 60


def gemma3_inputs() -> dict[str, torch.Tensor]:
    """Two left-padded prompts of different lengths, each with one 8px image (4 image tokens between its markers)."""
    torch.manual_seed(1)
    rows = [[5, 6, 61, *[GEMMA3_IMAGE] * 4, 62, 7, 8], [5, 6, 61, *[GEMMA3_IMAGE] * 4, 62, 7, 8, 9, 10]]
    ids = torch.full((2, 13), PAD)
    for b, row in enumerate(rows):
        ids[b, 13 - len(row):] = torch.tensor(row)
    return dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=torch.randn(2, 3, 8, 8),
                token_type_ids=(ids == GEMMA3_IMAGE).long())
