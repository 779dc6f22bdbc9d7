"""Entry points for training loops other than Lightning's Trainer, each thin glue over the core.

* :mod:`~lightning_grokfast.integrations.hook`: :func:`~lightning_grokfast.attach_grokfast`, an optimizer step
  pre-hook for plain PyTorch loops, Fabric and Accelerate (torch alone).
* :mod:`~lightning_grokfast.integrations.functional`: drop-in replacements for the paper's ``gradfilter_ema`` and
  ``gradfilter_ma`` (torch alone).
* :mod:`~lightning_grokfast.integrations.hf`: a Hugging Face ``transformers`` ``TrainerCallback`` (extra ``[hf]``).
"""
