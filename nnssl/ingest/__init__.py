"""``nnssl_ingest``: turn a folder (or list) of unlabeled 3D images into an nnU-Net raw dataset for pretraining.

Modules, one job each: ``discover`` (inputs, mask pairing, case names), ``stored_volume`` (what a file's header
promises), ``integrity`` (are the promised voxels there, is the spacing usable), ``validate`` (is one image usable),
``write_case`` (one case, atomically), ``staging`` (cases join the dataset only with its bookkeeping), ``summary``
(summary/manifest and dataset.json), ``datasets`` (where the dataset lives), ``run`` (the resumable, parallel
``ingest``) and ``cli`` (``nnssl_ingest``).
"""

from nnssl.ingest.errors import IngestError
from nnssl.ingest.run import IngestReport, ingest

__all__ = ["IngestError", "IngestReport", "ingest"]
