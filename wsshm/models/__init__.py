"""The matting network (U-Net + ASPP on a ResNet encoder), its registry, its weights on disk, and
what a network's output means (``outputs``)."""
from .io import load_torchvision_encoder, load_weights, read_header, read_weights, save_weights
from .outputs import forward_maps, has_logits, probabilities, split_output
from .registry import build_model, canonical_arch, list_models, register_model
from .resnet import ResNetEncoder
from .unet import MattingNet

__all__ = ["MattingNet", "ResNetEncoder", "build_model", "canonical_arch", "forward_maps", "has_logits",
           "list_models", "load_torchvision_encoder", "load_weights", "probabilities", "read_header", "read_weights",
           "register_model", "save_weights", "split_output"]
