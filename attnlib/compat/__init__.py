"""Drop-in call signatures of other attention libraries, and import aliases for them."""
from __future__ import annotations

import importlib.machinery
import sys
import types

from . import bert_padding, flash_attn, sageattention


def install_aliases(flash: bool = True, sage: bool = True) -> list[str]:
    """Register modules so unchanged code importing flash_attn or sageattention resolves to attnlib.

    Returns the module names registered. Existing real installs are replaced only in this
    process's sys.modules.
    """
    names = []
    if flash:
        pkg = types.ModuleType("flash_attn")
        pkg.__doc__ = "attnlib alias of flash_attn (attnlib.compat.flash_attn)"
        pkg.__path__ = []  # a package, so `import flash_attn.flash_attn_interface` works
        # a spec, so importlib.util.find_spec("flash_attn") (how libraries probe for it) answers
        # instead of raising ValueError on a module without one
        pkg.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
        pkg.__version__ = "2.6.3+attnlib"
        for n in flash_attn.__all__:
            setattr(pkg, n, getattr(flash_attn, n))
        sys.modules["flash_attn"] = pkg
        sys.modules["flash_attn.flash_attn_interface"] = flash_attn
        sys.modules["flash_attn.bert_padding"] = bert_padding
        pkg.flash_attn_interface, pkg.bert_padding = flash_attn, bert_padding
        names += ["flash_attn", "flash_attn.flash_attn_interface", "flash_attn.bert_padding"]
    if sage:
        sys.modules["sageattention"] = sageattention
        names.append("sageattention")
    return names


__all__ = ["bert_padding", "flash_attn", "sageattention", "install_aliases"]
