"""Tiny random-weight diffusers DiTs (built from configs, no download) for the attention-adapter tests.

Each builder returns ``(model in eval mode, forward kwargs)``; the caller seeds (``torch.manual_seed(0)``) and runs
``model(**inputs, return_dict=False)[0]``. Sizes: batch B=2, T=5 text tokens (Wan image-to-video needs 512),
2 heads, 1-2 layers per block type, and a non-square token grid after patching: (h, w) = (3, 4) for images,
(t, h, w) = (2, 3, 4) for video, so h/w (and t) mixups show (DiT: 4x4, it only unpatchifies square grids;
SkyReels diffusion forcing: (4, 2, 3), two causal blocks of 2 frames).
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch

B, T = 2, 5  # batch, text tokens
Built = tuple[torch.nn.Module, dict[str, Any]]


def _image(channels: int = 4, p: int = 2) -> torch.Tensor:
    """A (B, C, 3p, 4p) latent: a 3x4 token grid after p x p patching."""
    return torch.randn(B, channels, 3 * p, 4 * p)


def _video(channels: int = 4, p: int = 2) -> torch.Tensor:
    """A (B, C, 2, 3p, 4p) latent: a 2x3x4 token grid after 1 x p x p patching."""
    return torch.randn(B, channels, 2, 3 * p, 4 * p)


def _text(dim: int = 16, tokens: int = T) -> torch.Tensor:
    return torch.randn(B, tokens, dim)


def ragged_mask(tokens: int = T) -> torch.Tensor:
    """Text padding mask: sample 0 uses all tokens, sample 1 the first 3."""
    mask = torch.ones(B, tokens, dtype=torch.bool)
    mask[1, 3:] = False
    return mask


def _ltx() -> Built:
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16)
    # packed latents: (B, t*h*w, C), already patchified by the VAE; num_frames/height/width give the (2, 3, 4) grid
    inputs = dict(hidden_states=torch.randn(B, 2 * 3 * 4, 8), encoder_hidden_states=_text(),
                  timestep=torch.tensor([10, 10]), encoder_attention_mask=ragged_mask().long(),
                  num_frames=2, height=3, width=4)
    return model.eval(), inputs


def _mochi() -> Built:
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, max_sequence_length=16)
    # the processor attends per sample over [video, valid text] (padded text dropped by the mask)
    inputs = dict(hidden_states=_video(), encoder_hidden_states=_text(), timestep=torch.tensor([10, 10]),
                  encoder_attention_mask=ragged_mask())
    return model.eval(), inputs


def _sana() -> Built:
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=2)
    # self-attention is linear (ReLU kernel, no softmax); cross-attention uses the padding mask
    inputs = dict(hidden_states=_image(), encoder_hidden_states=_text(), timestep=torch.tensor([10, 10]),
                  encoder_attention_mask=ragged_mask().long())
    return model.eval(), inputs


def _auraflow() -> Built:
    model = diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64)  # pos_embed_max_size: number of positions (an 8x8 table)
    # 8 learned register tokens are prepended to the text inside the model
    inputs = dict(hidden_states=_image(), encoder_hidden_states=_text(), timestep=torch.tensor([10, 10]))
    return model.eval(), inputs


def _cogview4() -> Built:
    model = diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, rope_axes_dim=(8, 8))
    size = torch.tensor([[48, 64]] * B)  # original / target size in pixels (8 x the 6x8 latent)
    inputs = dict(hidden_states=_image(), encoder_hidden_states=_text(), timestep=torch.tensor([10, 10]),
                  original_size=size, target_size=size, crop_coords=torch.zeros(B, 2))
    return model.eval(), inputs


def _qwenimage() -> Built:
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    # packed latents: (B, h*w, 4 channels * 2*2 patch); img_shapes gives each sample's (frames, h, w) token grid
    inputs = dict(hidden_states=torch.randn(B, 3 * 4, 16), encoder_hidden_states=_text(),
                  encoder_hidden_states_mask=ragged_mask().long(), timestep=torch.tensor([0.5, 0.5]),
                  img_shapes=[(1, 3, 4)] * B)
    return model.eval(), inputs


def _skyreels_v2() -> Built:
    # diffusion-forcing setup: 4 latent frames in causal blocks of 2 frames, one timestep per frame
    model = diffusers.SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, num_frame_per_block=2)
    inputs = dict(hidden_states=torch.randn(B, 4, 4, 4, 6), encoder_hidden_states=_text(),
                  timestep=torch.tensor([[10, 10, 20, 20], [10, 10, 30, 30]]), enable_diffusion_forcing=True)
    return model.eval(), inputs


def _wan_vace() -> Built:
    model = diffusers.WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0],
        vace_in_channels=8)
    # control video (same grid) runs through the VACE blocks first; their hints are added after main block 0
    inputs = dict(hidden_states=_video(), encoder_hidden_states=_text(), timestep=torch.tensor([10, 10]),
                  control_hidden_states=_video(channels=8))
    return model.eval(), inputs


def _lumina2() -> Built:
    model = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 4, 4), axes_lens=(64, 64, 64),
        cap_feat_dim=16)
    # a full mask: with a ragged one each sample's image tokens start right after its own valid text
    inputs = dict(hidden_states=_image(), timestep=torch.tensor([0.5, 0.5]), encoder_hidden_states=_text(),
                  encoder_attention_mask=torch.ones(B, T, dtype=torch.bool))
    return model.eval(), inputs


def _hunyuanvideo15() -> Built:
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    # three conditioning streams: MLLM text (T), byT5 glyph text (3), image embeds (2; all zeros = text-to-video);
    # the model packs each sample's context as [valid image, valid byT5, valid text, padding]
    inputs = dict(hidden_states=torch.randn(B, 4, 2, 3, 4), timestep=torch.tensor([10.0, 10.0]),
                  encoder_hidden_states=_text(), encoder_attention_mask=ragged_mask().long(),
                  encoder_hidden_states_2=torch.randn(B, 3, 8), encoder_attention_mask_2=torch.ones(B, 3),
                  image_embeds=torch.zeros(B, 2, 8))
    return model.eval(), inputs


def _flux2() -> Built:
    model = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))
    # packed latents (B, h*w, C); rotary ids have 4 axes (t, h, w, l): image (0, row, col, 0), text (0, 0, 0, i)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(3), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(T))
    inputs = dict(hidden_states=torch.randn(B, 3 * 4, 4), encoder_hidden_states=_text(),
                  timestep=torch.tensor([0.5, 0.5]), img_ids=img_ids, txt_ids=txt_ids,
                  guidance=torch.tensor([3.5, 3.5]))
    return model.eval(), inputs


def _chroma() -> Built:
    model = diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1)
    # packed latents (B, h*w, C); rotary ids (row index, col index) per image token, zeros for text
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    # joint [text, image] mask as the pipeline builds it (text padding masked except the first pad token):
    # sample 1 has 3 real text tokens + 1 kept pad token, its last text token is masked (as query and as key)
    mask = torch.ones(B, T + 12, dtype=torch.bool)
    mask[1, 4:T] = False
    inputs = dict(hidden_states=torch.randn(B, 3 * 4, 4), encoder_hidden_states=_text(),
                  timestep=torch.tensor([0.5, 0.5]), img_ids=img_ids, txt_ids=torch.zeros(T, 3), attention_mask=mask)
    return model.eval(), inputs


def _dit() -> Built:
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        norm_num_groups=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    # class-conditional, no text; the output unpatchify assumes a square grid, so 4x4 here
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.tensor([10, 10]),
                  class_labels=torch.tensor([1, 3]))
    return model.eval(), inputs


def _wan_i2v() -> Built:
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=8, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=8,
        added_kv_proj_dim=24)
    # in_channels = noise + condition (mask/first-frame) channels; 3 CLIP image tokens (257 in Wan 2.1).
    # The cross-attention processor takes the last 512 context tokens as text (hard-coded), so T=512 here.
    inputs = dict(hidden_states=_video(channels=8), timestep=torch.tensor([10, 10]),
                  encoder_hidden_states=_text(tokens=512), encoder_hidden_states_image=torch.randn(B, 3, 8))
    return model.eval(), inputs


def _sd35() -> Built:
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    inputs = dict(hidden_states=_image(), encoder_hidden_states=_text(), pooled_projections=torch.randn(B, 8),
                  timestep=torch.tensor([10, 10]))
    return model.eval(), inputs


BUILDERS = {"ltx": _ltx, "mochi": _mochi, "sana": _sana, "auraflow": _auraflow, "cogview4": _cogview4,
            "qwenimage": _qwenimage, "skyreels_v2": _skyreels_v2, "wan_vace": _wan_vace, "lumina2": _lumina2,
            "hunyuanvideo15": _hunyuanvideo15, "flux2": _flux2, "chroma": _chroma, "dit": _dit,
            "wan_i2v": _wan_i2v, "sd35": _sd35}
