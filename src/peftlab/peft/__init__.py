"""Parameter-efficient fine-tuning: adapters injected into HF models, saved in HF peft's format.

``core`` selects and wraps layers and counts parameters for every method; each method is one
file (``lora``: LoRA, rsLoRA, DoRA; ``bottleneck``: Houlsby/Pfeiffer adapters; ``prompt_tuning``:
soft prompts; ``prefix``: prefix tuning; ``ia3``: (IA)^3; ``selective``: BitFit, LayerNorm and
chosen layers) and registers its on-disk format; ``formats`` reads and writes peft adapter folders;
``inspect`` reads soft prompts back as vocabulary tokens.
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
from peftlab.peft.formats import (
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
from peftlab.peft.bottleneck import BottleneckAdapter, BottleneckConfig, apply_bottleneck
from peftlab.peft.ia3 import IA3Config, IA3Linear, apply_ia3
from peftlab.peft.inspect import load_prompt_embeddings, nearest_tokens, prompt_embeddings
from peftlab.peft.prefix import PrefixConfig, apply_prefix
from peftlab.peft.prompt_tuning import PromptTuningConfig, apply_prompt_tuning, virtual_token_count
from peftlab.peft.qlora import apply_qlora, dequantize_model, is_quantized, quantize_model, weight_storage
from peftlab.peft.selective import SelectiveConfig, apply_selective

__all__ = [
    "apply_qlora",
    "dequantize_model",
    "is_quantized",
    "quantize_model",
    "weight_storage",
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "FORMATS",
    "AdapterFormat",
    "AdapterModule",
    "BottleneckAdapter",
    "BottleneckConfig",
    "IA3Config",
    "IA3Linear",
    "LoraConfig",
    "LoraLinear",
    "ParameterReport",
    "PrefixConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "adapter_modules",
    "adapter_parameters",
    "adapter_state_dict",
    "apply_bottleneck",
    "apply_ia3",
    "apply_lora",
    "apply_prefix",
    "apply_prompt_tuning",
    "apply_selective",
    "freeze_all_but_adapters",
    "get_module",
    "load_adapter",
    "load_adapter_state_dict",
    "load_prompt_embeddings",
    "lora_layers",
    "merge_adapters",
    "merge_and_unload",
    "nearest_tokens",
    "parameter_report",
    "parse_layers",
    "prompt_embeddings",
    "read_adapter_config",
    "register_format",
    "replace_module",
    "save_adapter",
    "select_modules",
    "unmerge_adapters",
    "virtual_token_count",
]
