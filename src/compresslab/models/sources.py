"""The sources' former home. Saved plans (``plan.json``) and configs written before the
architectures got a module each name ``compresslab.models.sources.<Source>``; these names
keep loading them. New code imports from the architecture modules."""

from compresslab.models.deep_linear import DeepLinear
from compresslab.models.llama import LocalHFCausalLM, TinyLlama, llama
from compresslab.models.vit import TimmViT, TinyViT, vit

__all__ = ["DeepLinear", "LocalHFCausalLM", "TimmViT", "TinyLlama", "TinyViT", "llama", "vit"]
