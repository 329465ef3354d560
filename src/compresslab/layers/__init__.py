"""Layers that compression puts into a model, each able to write itself into a saved
plan and be rebuilt from it (:mod:`compresslab.layers.base`). Importing this package
registers every kind, which is all the checkpoint loader needs."""

from compresslab.layers.base import FORMS, SavedForm, apply_plan, plan_of
from compresslab.layers.kronecker import KroneckerAdapterLinear
from compresslab.layers.lowrank import LowRankLinear
from compresslab.layers.resized import PrunedLinear, ResizedLinear

__all__ = ["FORMS", "SavedForm", "apply_plan", "plan_of", "KroneckerAdapterLinear",
           "LowRankLinear", "PrunedLinear", "ResizedLinear"]
