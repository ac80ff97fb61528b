"""The fidelity testbed: data generated here, small models trained here, and the eval harness.

Pretrained weights cannot be assumed, so fidelity is measured on models trained in this repo on
data it generates (:mod:`.data`), and the same harness takes a user's local checkpoints and image
folders. This release ships the ViT classifier (:mod:`.vit`), the LLaVA-style VLM (:mod:`.vlm`), the
class-conditional video DiT (:mod:`.video`), the class-conditional image UNet (:mod:`.image`; both
generators share :mod:`.diffusion`) and ``visattn eval vit`` / ``vlm`` / ``video`` / ``image`` (:mod:`.eval`):

    from visattn.testbed import eval_image, eval_video, eval_vit, eval_vlm
    result = eval_vit("tome", sweep=("r", [0, 4, 8]), n=1000, device="cpu")
    result = eval_vlm("prune", {"strategy": "fastv"}, sweep=("keep", [1.0, 0.5]), n=200, device="cpu")
    result = eval_video("sparse_video", sweep=("keep", [1.0, 0.5, 0.25]), n=16, device="cuda")
    result = eval_image("tome", {"scope": "block"}, sweep=("ratio", [0, 0.5]), n=32, device="cuda")
"""

from .eval import eval_image, eval_video, eval_vit, eval_vlm
from .image import load_image_unet, train_image_unet
from .video import load_video_dit, train_video_dit
from .vit import load_vit, train_vit
from .vlm import load_vlm, train_vlm

__all__ = ["eval_image", "eval_video", "eval_vit", "eval_vlm", "load_image_unet", "load_video_dit", "load_vit",
           "load_vlm", "train_image_unet", "train_video_dit", "train_vit", "train_vlm"]
