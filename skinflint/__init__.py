"""skinflint: an OpenAI-compatible LLM gateway that cuts the API bill.

Importing the package has no side effects; the gateway opens its services only when run.
"""

from skinflint.config import Settings, load_settings
from skinflint.errors import SkinflintError
from skinflint.models import LedgerRecord, Usage

__all__ = ["LedgerRecord", "Settings", "SkinflintError", "Usage", "__version__", "load_settings"]

__version__ = "0.1.0"
