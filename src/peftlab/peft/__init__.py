"""Parameter-efficient fine-tuning: adapters injected into HF models, saved in HF peft's format.

``core`` selects and wraps layers and counts parameters for every method; each method is one
file (``lora``: LoRA, rsLoRA, DoRA); ``io`` reads and writes peft adapter folders.
"""

from peftlab.peft.core import (
    ALL_LINEAR,
    DEFAULT_TARGETS,
    AdapterModule,
    ParameterReport,
    adapter_modules,
    adapter_parameters,
    adapter_state_dict,
    freeze_all_but_adapters,
    get_module,
    load_adapter_state_dict,
    parameter_report,
    parse_layers,
    replace_module,
    select_modules,
)
from peftlab.peft.io import (
    FORMATS,
    AdapterFormat,
    load_adapter,
    read_adapter_config,
    register_format,
    save_adapter,
)
from peftlab.peft.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_layers,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "FORMATS",
    "AdapterFormat",
    "AdapterModule",
    "LoraConfig",
    "LoraLinear",
    "ParameterReport",
    "adapter_modules",
    "adapter_parameters",
    "adapter_state_dict",
    "apply_lora",
    "freeze_all_but_adapters",
    "get_module",
    "load_adapter",
    "load_adapter_state_dict",
    "lora_layers",
    "merge_adapters",
    "merge_and_unload",
    "parameter_report",
    "parse_layers",
    "read_adapter_config",
    "register_format",
    "replace_module",
    "save_adapter",
    "select_modules",
    "unmerge_adapters",
]
