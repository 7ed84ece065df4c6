"""tpembed modeling: backbone, pooling, MRL head, Token Prepending, losses.

Imports neither `data` nor `train` nor accelerate.
"""

from tpembed.modeling.backbone import QWEN_TOKENIZER, TINY_QWEN3, load_backbone, load_tokenizer
from tpembed.modeling.encoder import Encoder, EncoderSpec, read_encoder_spec
from tpembed.modeling.head import DEFAULT_MRL_DIMS, MRLHead, validate_mrl_dims
from tpembed.modeling.objective import EmbeddingObjective
from tpembed.modeling.pooling import Pooling, last_token_positions, pool
from tpembed.modeling.token_prepending import TokenPrepending, parse_tp_layers

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
