"""immunizer: make open LLMs resistant to harmful fine-tuning, and make such fine-tuning visible."""
import sys
import types

__version__ = "0.1.0"

__all__ = ["ImmunizeConfig", "load_config", "immunize", "load_manifest", "__version__"]

# Imported on first use (PEP 562): `immunizer.immunize` pulls in torch and transformers (seconds), which the
# CLI's help, `immunizer review` and anything importing a light submodule (immunizer.settings) do not need.
_LAZY = {"ImmunizeConfig": "immunizer.config", "load_config": "immunizer.config", "immunize": "immunizer.immunize",
         "load_manifest": "immunizer.manifest"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'immunizer' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule `immunizer.immunize` binds it here, over the function of the same name that
        # `from immunizer import immunize` must keep giving (as when this file imported it eagerly).
        if name == "immunize" and isinstance(value, types.ModuleType):
            value = value.immunize
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
