"""One loader for every checkpoint format mokd evaluates: mokd's own, official MOKD, DINO, MoCo,
plain timm/torchvision state dicts and `.safetensors` files.

One module per job: `files` (reading and trust), `layouts` (what a file holds), `architecture` (inference
from tensor shapes), `loading` (strict loading) and `inspection` (the `inspect` report). The names below
are the public interface; import them from here.
"""

from mokd.core.checkpoints.architecture import VIT_HEAD_DIM, infer_arch
from mokd.core.checkpoints.files import (MODULE_PREFIX, SAFE_GLOBALS, TRUSTED, file_sha256, load_object,
                                         load_resume_state, strip_module_prefix)
from mokd.core.checkpoints.inspection import inspect_checkpoint
from mokd.core.checkpoints.layouts import (BACKBONE, HEAD_PREFIXES, OFFICIAL_MODELS, CheckpointFile, ModelEntry,
                                           read_checkpoint)
from mokd.core.checkpoints.loading import LoadedBackbone, load_backbones

__all__ = [
    "BACKBONE", "HEAD_PREFIXES", "MODULE_PREFIX", "OFFICIAL_MODELS", "SAFE_GLOBALS", "TRUSTED", "VIT_HEAD_DIM",
    "CheckpointFile", "LoadedBackbone", "ModelEntry", "file_sha256", "infer_arch", "inspect_checkpoint",
    "load_backbones", "load_object", "load_resume_state", "read_checkpoint", "strip_module_prefix",
]
