"""The fidelity testbed: data generated here, small models trained here, and the eval harness.

Pretrained weights cannot be assumed, so fidelity is measured on models trained in this repo on
data it generates (:mod:`.data`), and the same harness takes a user's local checkpoints and image
folders. This release ships the ViT classifier (:mod:`.vit`) and ``visattn eval vit`` (:mod:`.eval`):

    from visattn.testbed import eval_vit
    result = eval_vit("tome", sweep=("r", [0, 4, 8]), n=1000, device="cpu")
"""

from .eval import eval_vit
from .vit import load_vit, train_vit

__all__ = ["eval_vit", "load_vit", "train_vit"]
