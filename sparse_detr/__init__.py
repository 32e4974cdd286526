"""sparse-detr: Sparse DETR (Roh et al., ICLR 2022) and Deformable DETR, in one PyTorch training framework.

Layers (who may import whom): `ops` (the deformable attention op) ← `models` ← `engine`; `data` and `config`
stand alone; `tools/` are thin command-line entry points. See the README.
"""
__version__ = "0.1.0"
