"""``nnsslFingerprintExtractor``: a header-only dataset fingerprint for large unlabeled collections.

nnU-Net's extractor reads every image and label completely to sample foreground intensities, which only CT
normalisation needs. nnssl's planners normalise with z-score and fix spacing and patch, so spacings and shapes from
the image headers are enough: thousands of volumes are fingerprinted in seconds. Intensity statistics are still
written (nnU-Net's plans carry them) from a seeded sample of cases read completely.
Use: ``nnUNetv2_plan_and_preprocess -d ID -pl nnsslPlanner -fpe nnsslFingerprintExtractor``.
"""

from multiprocessing.pool import ThreadPool
from typing import List, Tuple

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, save_json
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.paths import nnUNet_preprocessed

from nnssl.errors import UserError

PERCENTILES = (0.5, 50.0, 99.5)


def read_geometry_from_header(image_file: str) -> Tuple[List[float], List[int]]:
    """Spacing and shape in nnU-Net's (numpy) axis order, without reading the voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(image_file)
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise UserError(f"{image_file}: expected a 3D image, found {reader.GetDimension()} dimensions")
    return [float(s) for s in reader.GetSpacing()[::-1]], [int(s) for s in reader.GetSize()[::-1]]


class nnsslFingerprintExtractor(DatasetFingerprintExtractor):
    cases_for_intensity_statistics = 16
    seed = 1234

    def _geometry(self, reader_writer_class) -> Tuple[list, list]:
        first_images = [self.dataset[k]["images"][0] for k in self.dataset]
        if reader_writer_class is SimpleITKIO:
            with ThreadPool(max(1, self.num_processes)) as pool:
                geometry = pool.map(read_geometry_from_header, first_images)
        else:  # other readers define their own axis conventions: ask them
            geometry = []
            for images in (self.dataset[k]["images"] for k in self.dataset):
                data, properties = reader_writer_class().read_images(images)
                geometry.append(([float(s) for s in properties["spacing"]], list(data.shape[1:])))
        return [g[0] for g in geometry], [g[1] for g in geometry]

    def _intensity_statistics(self, reader_writer_class) -> Tuple[dict, float]:
        keys = sorted(self.dataset)
        rng = np.random.default_rng(self.seed)
        sample = rng.choice(keys, size=min(self.cases_for_intensity_statistics, len(keys)), replace=False)
        samples_per_case = int(self.num_foreground_voxels_for_intensitystats // len(sample))
        results = [self.analyze_case(self.dataset[k]["images"], self.dataset[k]["label"], reader_writer_class,
                                     samples_per_case) for k in sample]
        n_channels = len(self.dataset_json["channel_names"])
        statistics = {}
        for channel in range(n_channels):
            values = np.concatenate([r[2][channel] for r in results])
            low, median, high = np.percentile(values, PERCENTILES)
            statistics[channel] = {"mean": float(values.mean()), "median": float(median), "std": float(values.std()),
                                   "min": float(values.min()), "max": float(values.max()),
                                   "percentile_99_5": float(high), "percentile_00_5": float(low)}
        return statistics, float(np.median([r[4] for r in results]))

    def run(self, overwrite_existing: bool = False) -> dict:
        output_folder = join(nnUNet_preprocessed, self.dataset_name)
        maybe_mkdir_p(output_folder)
        fingerprint_file = join(output_folder, "dataset_fingerprint.json")
        if isfile(fingerprint_file) and not overwrite_existing:
            return load_json(fingerprint_file)
        first_case = next(iter(self.dataset.values()))
        reader_writer_class = determine_reader_writer_from_dataset_json(self.dataset_json, first_case["images"][0])
        spacings, shapes = self._geometry(reader_writer_class)
        statistics, median_relative_size = self._intensity_statistics(reader_writer_class)
        fingerprint = {
            "spacings": spacings,
            "shapes_after_crop": shapes,  # header shapes: nnssl's planners use them for reporting only
            "foreground_intensity_properties_per_channel": statistics,
            "median_relative_size_after_cropping": median_relative_size,
            "nnssl_fingerprint": f"header-only; intensity statistics from {len(shapes)} cases' sample of "
                                 f"{min(self.cases_for_intensity_statistics, len(shapes))}",
        }
        save_json(fingerprint, fingerprint_file)
        return fingerprint
