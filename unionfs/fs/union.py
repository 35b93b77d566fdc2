"""The filesystem's façade (being split out of core.py)."""
from .core import Caller, Union

__all__ = ["Caller", "Union"]
