"""LightningModules wrapping the plain models of ``var_lab.models``."""

from var_lab.modules.tokenizer import TokenizerModule, load_tokenizer, load_tokenizer_checkpoint
from var_lab.modules.var import VARModule, load_var_checkpoint

__all__ = ["TokenizerModule", "VARModule", "load_tokenizer", "load_tokenizer_checkpoint", "load_var_checkpoint"]
