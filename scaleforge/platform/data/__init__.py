"""Data loading: the stateful-iterator interface and the webdataset loader."""
from scaleforge.platform.data.base import StatefulIterator

__all__ = ["StatefulIterator"]
