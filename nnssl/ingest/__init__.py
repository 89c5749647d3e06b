"""``nnssl_ingest``: turn a folder (or list) of unlabeled 3D images into an nnU-Net raw dataset for pretraining.

Modules, one job each: ``discover`` (inputs, mask pairing, case names), ``validate`` (is one image usable),
``write_case`` (one case, atomically), ``summary`` (summary/manifest and dataset.json), ``datasets`` (where the
dataset lives), ``run`` (the resumable, parallel ``ingest``) and ``cli`` (``nnssl_ingest``).
"""

from nnssl.ingest.errors import IngestError
from nnssl.ingest.run import IngestReport, ingest

__all__ = ["IngestError", "IngestReport", "ingest"]
