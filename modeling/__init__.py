"""tpembed modeling: backbone, pooling, MRL head, Token Prepending, losses.

Imports neither `data` nor `train` nor accelerate.
"""

from .backbone import QWEN_TOKENIZER, TINY_QWEN3, load_backbone, load_tokenizer
from .encoder import Encoder, EncoderSpec, read_encoder_spec
from .head import DEFAULT_MRL_DIMS, MRLHead, validate_mrl_dims
from .objective import EmbeddingObjective
from .pooling import Pooling, last_token_positions, pool
from .token_prepending import TokenPrepending, parse_tp_layers

__all__ = [
    "DEFAULT_MRL_DIMS",
    "EmbeddingObjective",
    "Encoder",
    "EncoderSpec",
    "MRLHead",
    "Pooling",
    "QWEN_TOKENIZER",
    "TINY_QWEN3",
    "TokenPrepending",
    "last_token_positions",
    "load_backbone",
    "load_tokenizer",
    "parse_tp_layers",
    "pool",
    "read_encoder_spec",
    "validate_mrl_dims",
]
