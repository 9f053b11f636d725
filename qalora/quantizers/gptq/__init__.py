"""GPTQ quantization through GPTQModel, converted exactly into the canonical low-bit format.

:func:`quantize_model_gptq` mirrors :func:`qalora.quantizers.rtn.quantize_model_rtn`: it replaces
the target ``nn.Linear`` layers of an fp32 HF causal LM in place with
:class:`qalora.lowbit.LowBitLinear`. Three modules, one role each:

- :mod:`.runner` (the parent process): saves the model (fp32 safetensors) and its tokenizer to a
  temporary folder under ``work_dir`` (GPTQModel loads models from folders and wants a tokenizer
  there), starts the child, shows a per-decoder-layer progress bar, then reads the checkpoint back
  and swaps the layers in;
- :mod:`.child` (``python -m qalora.quantizers.gptq.child JOB.json``): runs GPTQModel (asymmetric by
  default, act-order/``desc_act`` off so groups stay contiguous, true-sequential on, in fp32 on the
  CPU or a GPU: ``device``), its log going to ``gptqmodel.log``. The child keeps GPTQModel's import-time side effects
  (monkey patches of transformers/safetensors, env vars such as HF_HOME set by its tokenizer
  helper, worker thread pools, the global torch RNG its first quantize advances) out of the caller;
- :mod:`.reader`: reads any GPTQModel/AutoGPTQ GPTQ checkpoint (``checkpoint_format`` ``gptq`` = v1
  or ``gptq_v2``, int32 words, contiguous groups) exactly: codes and zeros integer-identical,
  scales the same fp16 values (the layout and the v1 zero-1 rule are in its doc).
"""

from __future__ import annotations

from qalora.quantizers.gptq.reader import (
    GPTQLayer,
    apply_gptq_checkpoint,
    apply_gptq_layers,
    read_gptq_checkpoint,
    read_gptq_config,
    unpack_gptq_qweight,
    unpack_gptq_zeros,
)
from qalora.quantizers.gptq.runner import (
    DEFAULT_DAMP_PERCENT,
    GPTQMODEL_GROUP_SIZES,
    gptqmodel_env,
    quantize_model_gptq,
)

__all__ = [
    "DEFAULT_DAMP_PERCENT", "GPTQLayer", "GPTQMODEL_GROUP_SIZES", "apply_gptq_checkpoint", "apply_gptq_layers",
    "gptqmodel_env", "quantize_model_gptq", "read_gptq_checkpoint", "read_gptq_config", "unpack_gptq_qweight",
    "unpack_gptq_zeros",
]
