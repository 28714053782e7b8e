"""One adapter per storage kind of routed experts (fused transformers-5 experts in every layout their decorator
describes, LLaMA-MoE ``ParameterList``s, MoLM ``ParallelExperts``, DBRX's ``[E·I, H]`` row stacks, Llama 4's experts
that run every expert on every token): the projections features may adapt and how per-expert deltas run inside
them."""

from model_patches.expert_storage.base import DELTAS_ATTRIBUTE
from model_patches.expert_storage.base import ChangeLog
from model_patches.expert_storage.base import ExpertStorage
from model_patches.expert_storage.base import RoutedDeltas
from model_patches.expert_storage.base import RoutedProjection
from model_patches.expert_storage.fused import FusedExperts
from model_patches.expert_storage.fused import FusedLayout
from model_patches.expert_storage.parallel import ParallelExpertModules
from model_patches.expert_storage.parameter_list import ParameterListExperts
from model_patches.expert_storage.scaled_dense import ScaledDenseExperts
from model_patches.expert_storage.stacked_rows import StackedRowExperts
from model_patches.structure import MoEModel

STORAGES: dict[str, ExpertStorage] = {storage.kind: storage
                                      for storage in (FusedExperts(), ParameterListExperts(), ParallelExpertModules(),
                                                      StackedRowExperts(), ScaledDenseExperts())}


def storage_of(moe: MoEModel) -> ExpertStorage:
    """The adapter for the routed experts of ``moe`` (its family's ``expert_storage``)."""
    return STORAGES[moe.family.expert_storage]


__all__ = ["DELTAS_ATTRIBUTE", "STORAGES", "ChangeLog", "ExpertStorage", "FusedExperts", "FusedLayout",
           "ParallelExpertModules", "ParameterListExperts", "RoutedDeltas", "RoutedProjection", "ScaledDenseExperts",
           "StackedRowExperts", "storage_of"]
