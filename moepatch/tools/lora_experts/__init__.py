"""LoRA experts' offline tools: GuiLoMo's allocation search (:mod:`.allocate`, :mod:`.guilomo`), importers of the
official MoLA / GuiLoMo checkpoints (:mod:`.importers`), merging the experts into the base weights (:mod:`.merge`) and
the peft export (:mod:`.export`).  The layers and their injection — what runs when a model is patched — are
:mod:`moepatch.lora_experts`."""

from moepatch.tools.lora_experts.export import export_peft
from moepatch.tools.lora_experts.importers import guilomo_allocation
from moepatch.tools.lora_experts.importers import guilomo_block
from moepatch.tools.lora_experts.importers import import_guilomo
from moepatch.tools.lora_experts.importers import import_mola
from moepatch.tools.lora_experts.importers import mola_block
from moepatch.tools.lora_experts.importers import read_adapter_weights
from moepatch.tools.lora_experts.importers import write_guilomo_allocation
from moepatch.tools.lora_experts.merge import merge_into_base

__all__ = ["export_peft", "guilomo_allocation", "guilomo_block", "import_guilomo", "import_mola", "merge_into_base",
           "mola_block", "read_adapter_weights", "write_guilomo_allocation"]
