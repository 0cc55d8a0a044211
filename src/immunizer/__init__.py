"""immunizer: make open LLMs resistant to harmful fine-tuning, and make such fine-tuning visible."""
__version__ = "0.1.0"

from immunizer.config import ImmunizeConfig, load_config  # noqa: E402
from immunizer.immunize import immunize  # noqa: E402
from immunizer.manifest import load_manifest  # noqa: E402

__all__ = ["ImmunizeConfig", "load_config", "immunize", "load_manifest", "__version__"]
