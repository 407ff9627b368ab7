import torch
from torch import nn

from infera.layers.linear import default_weight_loader, make_quant_method
from infera.quant.base import QuantizeMethodBase


class VocabEmbedding(nn.Module):
    """Token embeddings; the quant method (float by default) stores ``weight [vocab, hidden]``."""

    def __init__(self, vocab_size: int, hidden_size: int, quant_method: QuantizeMethodBase | None = None):
        super().__init__()
        self.weight_loader = default_weight_loader
        self.quant_method = make_quant_method(self, quant_method)
        self.quant_method.create_weights(self, hidden_size, [vocab_size], False, torch.get_default_dtype())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.quant_method.embedding(self, input_ids)


class LMHead(VocabEmbedding):
    """Projects hidden states to vocabulary logits (shares the embedding when tied)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, hidden)
