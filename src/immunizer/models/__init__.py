"""Model loading: the embedded default, the tiny test model, local directories and GGUF files."""
from immunizer.models.hashing import model_dir_sha256, state_dict_sha256
from immunizer.models.loading import load_model, resolve_model, runtime_device

__all__ = ["load_model", "resolve_model", "runtime_device", "model_dir_sha256", "state_dict_sha256"]
