"""qalora: fine-tune LLMs directly in low bit with QA-LoRA and ship the merged model still quantized."""

import logging as _logging

# torchao (pulled in by GPTQModel, imported by transformers) warns about CUDA-only extensions it
# cannot load on CPU machines, and torch about its Enum registrations; neither affects qalora.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

__version__ = "0.1.0"
