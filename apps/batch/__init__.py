"""``dlpipe predict``: a model over a large set of images (a folder tree, a list file or a Parquet table),
results written incrementally to Parquet or JSON lines and resumed after a kill (issue 14)."""

from dlpipe.apps.batch.predict import predict_batch
from dlpipe.apps.batch.results import read_results

__all__ = ["predict_batch", "read_results"]
