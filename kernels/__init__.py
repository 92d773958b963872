"""Triton kernels of sepedge (shipped as sepedge.kernels): one file per op, each with its kernel, its
launcher and a small torch reference. Weights are the GGUF bytes as uint8 tensors on the device, the common
quantized types repacked once into aligned code and scale arrays (packed.py).

Needs torch and triton (`pip install sepedge[triton]`); runs on NVIDIA GPUs (sm_80, sm_90) and, with
TRITON_INTERPRET=1 set before triton is imported, on CPU tensors through Triton's interpreter.
"""

from .act_f16 import ActF16, act_f16, act_f16_ref
from .act_q8 import Act, act_q8, act_q8_ref
from .attention_decode import attention_decode, attention_decode_ref
from .attention_prefill import attention_prefill, attention_prefill_ref
from .head import head, head_ref
from . import matmul as matmul_mod
from .matmul import dequantize_f16, dequantize_f16_ref, matmul, matmul_ref
from .matvec import FLOAT_TYPES, matvec, matvec_glu, matvec_norm, matvec_ref
from .packed import PACKED_TYPES, Packed, dequantize_packed_ref, pack
from .quants import BLOCKS, NAMES, dequantize, dequantize_ref, get_rows, row_bytes
from .rms_norm import rms_norm, rms_norm_ref
from .rope import NEOX, NORM, inv_freq, rope_, rope_ref, rope_store
from .swiglu import swiglu, swiglu_ref

__all__ = ["Act", "ActF16", "BLOCKS", "FLOAT_TYPES", "NAMES", "NEOX", "NORM", "PACKED_TYPES", "Packed",
           "act_f16", "act_f16_ref", "act_q8", "act_q8_ref", "attention_decode", "attention_decode_ref",
           "attention_prefill", "attention_prefill_ref", "dequantize", "dequantize_f16",
           "dequantize_f16_ref", "dequantize_packed_ref", "dequantize_ref", "get_rows", "head",
           "head_ref", "inv_freq", "matmul", "matmul_ref", "matvec", "matvec_glu", "matvec_norm",
           "matvec_ref", "pack", "rms_norm", "rms_norm_ref", "rope_", "rope_ref", "rope_store",
           "row_bytes", "swiglu", "swiglu_ref"]
