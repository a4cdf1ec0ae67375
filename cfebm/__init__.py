"""cfebm: coarse-to-fine energy-based image models (Zhao, Xie & Li, ICLR 2021).

The library is pure PyTorch + numpy + fsspec. It never imports Ray, MLflow or DVC:
those live in ``pipelines/``.
"""

__version__ = "0.1.0"
