"""A compressed model exported by compresslab (its docs/export.md).

Loaded by ``transformers.AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)``: the model class below is the stock transformers class with the
linears listed in ``config.compresslab_layers`` replaced, before the weights are read, by

- ``lowrank``: ``y = second(first(x))``, ``first`` a (rank x in) linear without bias and
  ``second`` an (out x rank) linear (a factorised weight ``W ~= second.weight @ first.weight``);
- ``linear``: a linear of another shape (structured pruning removed rows or columns; the
  attention infers its head count from the projections' shapes).

This file depends on torch and transformers only.
"""

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class CompressedLlamaConfig(LlamaConfig):
    # a model type of its own: without trust_remote_code, transformers refuses the folder
    # instead of loading the stock class with re-initialised compressed weights
    model_type = "compresslab_llama"


class LowRankLinear(nn.Module):
    def __init__(self, in_features, out_features, rank, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.second(self.first(x))


def compressed_layer(entry):
    if entry["kind"] == "lowrank":
        return LowRankLinear(entry["in_features"], entry["out_features"], entry["rank"],
                             bias=entry["bias"])
    if entry["kind"] == "linear":
        return nn.Linear(entry["in_features"], entry["out_features"], bias=entry["bias"])
    raise ValueError(f"unknown compressed layer kind {entry['kind']!r}")


class CompressedLlamaForCausalLM(LlamaForCausalLM):
    config_class = CompressedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        for name, entry in config.compresslab_layers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child, compressed_layer(entry))
