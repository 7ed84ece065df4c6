"""Losses: pure functions of embeddings, one concept per file."""

from tpembed.modeling.losses.classification import masked_classification_loss
from tpembed.modeling.losses.cosent import cosent_loss
from tpembed.modeling.losses.infonce import info_nce_loss
from tpembed.modeling.losses.matryoshka import matryoshka_loss

__all__ = ["cosent_loss", "info_nce_loss", "masked_classification_loss", "matryoshka_loss"]
