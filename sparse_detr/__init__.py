"""sparse-detr: Sparse DETR (Roh et al., ICLR 2022) and Deformable DETR, in one PyTorch training framework.

Layers (who may import whom): `ops` (the deformable attention op) ← `models` ← `engine`; `data` and `config`
stand alone; `tools/` are thin command-line entry points. See the README.

`sparse_detr.Predictor` (detections on your own images, `engine/inference/predictor.py`) is imported on first use, so
`import sparse_detr.config` stays light.
"""
__version__ = "0.1.0"
__all__ = ["Predictor"]


def __getattr__(name: str):
    if name == "Predictor":
        from sparse_detr.engine.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'sparse_detr' has no attribute {name!r}")
