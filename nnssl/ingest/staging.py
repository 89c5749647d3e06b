"""Making an ingest run's cases part of the dataset only together with its bookkeeping.

A run writes every case into a staging folder first; ``publish`` then moves the finished cases in, deletes the
cases to remove, and rewrites ``dataset.json`` and the summary for what the dataset then holds. A run that is killed
between publications leaves the dataset as the previous publication left it (a first ingest: no dataset folder at
all) plus a hidden staging folder, which the next run deletes. A new dataset comes into being by renaming its
complete staging folder (images, labels, dataset.json, summary) to ``DatasetNNN_Name``, so it never exists half.

The staging folder lies on the dataset's file system so that moving a case is a rename: inside the dataset folder
when it exists, else next to it in ``nnUNet_raw`` (a hidden name, which nnU-Net's dataset lookup never matches).
"""

import glob
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, List

from nnssl.ingest.errors import IngestError
from nnssl.ingest.write_case import image_path, label_path

TEMP_PREFIX = ".nnssl_ingest_tmp_"
CASE_FOLDERS = ("imagesTr", "labelsTr")

Bookkeeping = Callable[[str], None]


def remove_case(dataset_folder: str, case_id: str) -> None:
    """Delete a case nnssl wrote earlier (image first, so an image never exists without its label)."""
    for path in (image_path(dataset_folder, case_id), label_path(dataset_folder, case_id)):
        if os.path.exists(path):
            os.remove(path)


def require_writable(folder: str, purpose: str) -> None:
    """Fail before any work when ``folder`` cannot take new files (permissions, a read-only disk): a probe file is
    created and deleted, which also sees what the permission bits do not (ACLs, read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=TEMP_PREFIX):
            pass
    except OSError as error:
        raise IngestError(f"{folder} is not writable ({error.strerror}): nnssl_ingest {purpose} there. Make it "
                          f"writable for this user, or point nnUNet_raw at a folder you can write.") from None


class DatasetStaging:
    """The staging folder of one run (fixed for the run: the workers write there) and the changes it holds."""

    def __init__(self, dataset_folder: Path):
        self.dataset_folder = dataset_folder
        for stale in self._stale_folders():  # left behind by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        if dataset_folder.is_dir():
            require_writable(str(dataset_folder), "updates the dataset")
            for name in CASE_FOLDERS:
                os.makedirs(dataset_folder / name, exist_ok=True)
                require_writable(str(dataset_folder / name), "writes cases")
        else:
            require_writable(str(dataset_folder.parent), f"creates {dataset_folder.name}")
        self.folder = self._new_folder()
        self.staged: List[str] = []
        self.removed: List[str] = []

    def _stale_folders(self) -> List[str]:
        return (glob.glob(str(self.dataset_folder.parent / f"{TEMP_PREFIX}{self.dataset_folder.name}_*"))
                + glob.glob(str(self.dataset_folder / f"{TEMP_PREFIX}*")))

    def _new_folder(self) -> str:
        """A hidden folder with imagesTr/labelsTr on the dataset's file system, with the permissions the user's umask
        gives (it may become the dataset folder; ``mkdtemp`` would make it private)."""
        if self.dataset_folder.is_dir():
            parent, prefix = self.dataset_folder, TEMP_PREFIX
        else:
            parent, prefix = self.dataset_folder.parent, f"{TEMP_PREFIX}{self.dataset_folder.name}_"
        folder = os.path.join(parent, f"{prefix}{os.getpid()}_{uuid.uuid4().hex[:8]}")
        for name in CASE_FOLDERS:
            os.makedirs(os.path.join(folder, name))
        return folder

    def publish(self, write_bookkeeping: Bookkeeping) -> None:
        """Make the staged cases and removals part of the dataset; ``write_bookkeeping(folder)`` then writes
        dataset.json and the summary into ``folder`` for the cases found there. An existing dataset always gets them
        (the summary also lists the run's rejections); a new one is assembled in a hidden folder and renamed into
        place, and only when it has a case."""
        exists = self.dataset_folder.is_dir()
        if not exists and not self.staged:
            return
        target = str(self.dataset_folder) if exists else self._new_folder()
        try:
            for case_id in self.removed:
                remove_case(target, case_id)
            for case_id in self.staged:
                self._move(case_id, target)
        finally:
            write_bookkeeping(target)
        if not exists:
            os.rename(target, self.dataset_folder)
        self.staged, self.removed = [], []

    def _move(self, case_id: str, target: str) -> None:
        """Label first, then image: never an image without its label, nor a label left behind when the image
        cannot follow."""
        os.replace(label_path(self.folder, case_id), label_path(target, case_id))
        try:
            os.replace(image_path(self.folder, case_id), image_path(target, case_id))
        except OSError:
            os.remove(label_path(target, case_id))
            raise

    def close(self) -> None:
        """Delete the staging folder and whatever it still holds (cases that were never published)."""
        shutil.rmtree(self.folder, ignore_errors=True)
