"""skinflint: an OpenAI-compatible LLM gateway that cuts the API bill.

Importing the package has no side effects; the gateway opens its services only when run.
``batch_map`` and ``abatch_map`` (in-prompt batching, :mod:`skinflint.batch_client`) import
the openai SDK when first used.
"""

from typing import TYPE_CHECKING, Any

from skinflint.config import Settings, load_settings
from skinflint.errors import SkinflintError
from skinflint.models import LedgerRecord, Usage

if TYPE_CHECKING:
    from skinflint.batch_client import abatch_map, batch_map

__all__ = [
    "LedgerRecord",
    "Settings",
    "SkinflintError",
    "Usage",
    "__version__",
    "abatch_map",
    "batch_map",
    "load_settings",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("batch_map", "abatch_map"):
        from skinflint import batch_client

        return getattr(batch_client, name)
    raise AttributeError(f"module 'skinflint' has no attribute {name!r}")
