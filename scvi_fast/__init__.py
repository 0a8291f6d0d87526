"""scvi_fast: a fast, drop-in backend for scVI.

``scvi_fast.SCVI`` mirrors ``scvi.model.SCVI``; ``scvi_fast.functional`` holds
the fused ops; ``scvi_fast.data`` the CSR store and loader.
"""

__version__ = "0.1.0"

from scvi_fast import data, functional  # noqa: E402
from scvi_fast.model import SCVI  # noqa: E402

__all__ = ["SCVI", "data", "functional", "__version__"]
