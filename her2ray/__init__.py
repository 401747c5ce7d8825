"""her2ray: HER2 scoring (IHC 0/1+/2+/3+) from H&E whole-slide images, at cohort scale on Ray."""

__version__ = "0.1.0"
