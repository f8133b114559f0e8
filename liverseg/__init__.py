"""liverseg: CPU-first liver and liver-tumour segmentation of 3D CT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("liverseg")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

LABEL_NAMES: dict[int, str] = {0: "background", 1: "liver", 2: "tumour"}
