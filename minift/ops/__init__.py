"""minift's fused ops: each a Triton kernel with custom autograd, registered with torch.library,
and a plain-PyTorch reference (`minift.ops.reference`) that defines what it computes.

One module per op family (rms_norm, layer_norm, rope, activations, cross_entropy, gemv, nf4,
nf4_matmul, lora, decode_attention);
`_backend` holds the dispatch options and `Op`, the pattern every op is registered through.
"""

from ._backend import (backend, compiled_elementwise, get_backend, get_compiled_elementwise, prepare_tickets,
                       set_backend, set_compiled_elementwise)
from .activations import geglu, swiglu
from .cross_entropy import cross_entropy, linear_cross_entropy
from .decode_attention import decode_attention, takes_decode_attention
from .gemv import gemv, gemv_cat, gemv_glu, linear, linear_cat, takes_gemv
from .layer_norm import layer_norm
from .lora import lora_linear, lora_mlp
from .nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_many, nf4_linear
from .nf4_matmul import nf4_matmul
from .rms_norm import rms_norm
from .rope import rope

__all__ = [
    "backend",
    "get_backend",
    "set_backend",
    "compiled_elementwise",
    "get_compiled_elementwise",
    "set_compiled_elementwise",
    "rms_norm",
    "layer_norm",
    "rope",
    "swiglu",
    "geglu",
    "cross_entropy",
    "linear_cross_entropy",
    "decode_attention",
    "takes_decode_attention",
    "NF4Weight",
    "dequantize_nf4",
    "dequantize_nf4_many",
    "nf4_linear",
    "gemv",
    "gemv_cat",
    "gemv_glu",
    "linear",
    "linear_cat",
    "takes_gemv",
    "nf4_matmul",
    "prepare_tickets",
    "lora_linear",
    "lora_mlp",
]
