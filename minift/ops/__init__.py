"""minift's fused ops: each a Triton kernel with custom autograd, registered with torch.library,
and a plain-PyTorch reference (`minift.ops.reference`) that defines what it computes."""

from ._backend import backend, get_backend, set_backend
from .activations import geglu, swiglu
from .cross_entropy import cross_entropy, linear_cross_entropy
from .lora import lora_linear, lora_mlp
from .nf4 import NF4Weight, dequantize_nf4
from .norms import layer_norm, rms_norm
from .rope import rope

__all__ = [
    "backend",
    "get_backend",
    "set_backend",
    "rms_norm",
    "layer_norm",
    "rope",
    "swiglu",
    "geglu",
    "cross_entropy",
    "linear_cross_entropy",
    "NF4Weight",
    "dequantize_nf4",
    "lora_linear",
    "lora_mlp",
]
