"""The matting network (U-Net + ASPP on a ResNet encoder), its registry and its weights on disk."""
from .io import load_torchvision_encoder, load_weights, matte_logits, read_weights, save_weights
from .registry import build_model, canonical_arch, list_models, register_model
from .resnet import ResNetEncoder
from .unet import ASPP_RATES, OUTPUT_STRIDE, MattingNet

__all__ = ["ASPP_RATES", "OUTPUT_STRIDE", "MattingNet", "ResNetEncoder", "build_model", "canonical_arch",
           "list_models", "load_torchvision_encoder", "load_weights", "matte_logits", "read_weights",
           "register_model", "save_weights"]
