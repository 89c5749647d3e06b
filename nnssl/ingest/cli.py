"""``nnssl_ingest`` command line: a thin argparse wrapper around ``nnssl.ingest.ingest``."""

import argparse
import sys
from functools import partial
from typing import List, Optional

from nnssl.ingest.discover import IMAGE_EXTENSIONS
from nnssl.ingest.run import default_num_processes, ingest
from nnssl.integration.user_errors import run_user_command

DESCRIPTION = f"""\
Turn unlabeled 3D images into an nnU-Net raw dataset ($nnUNet_raw/Dataset<ID>_<NAME>) for self-supervised
pretraining. Images ({', '.join(IMAGE_EXTENSIONS)}) of any spacing, orientation, size and pixel type are copied
as imagesTr/<case>_0000.nii.gz with identical voxel values and geometry (no resampling, no reorientation), next to
a placeholder label map labelsTr/<case>.nii.gz: 1 = anatomy (every voxel when no anatomy mask is given),
0 = outside the anatomy mask, 2 = anonymised (anonymization mask > 0, overrides the rest). Invalid images
(unreadable, truncated or corrupt, invalid spacing, not 3D, not scalar, NaN/inf, constant, too small, mask
problems) are rejected with a reason in nnssl_ingest_summary.json; the rest of the batch continues. Re-running
skips cases whose source is unchanged and adds new ones. Source files are never modified."""

EPILOG = """\
mask matching (--anatomy_masks / --anonymization_masks DIR):
  1. relative path: <input dir>/sub/x.nii.gz uses DIR/sub/x.<any image extension>
     (an image from a list file uses DIR/x.<ext>)
  2. otherwise file stem: the single file named x.<ext> anywhere under DIR
  3. otherwise no mask for that image.
  Several candidates are ambiguous and reject the image. Mask columns of a list file win over mask folders.

list file (-l): one image path per line, or a TSV/CSV whose header has an 'image' column and optionally
  'anatomy_mask' and 'anonymization_mask' (other columns are ignored). Relative paths are relative to the list
  file. Blank lines and lines starting with # are ignored.

next step: nnUNetv2_plan_and_preprocess -d ID -pl nnsslPlanner -c 3d_fullres -fpe nnsslFingerprintExtractor
  (-fpe: the header-only fingerprint, which reads the voxels of 16 sampled cases only)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnssl_ingest", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", dest="input_dirs", nargs="+", default=[], metavar="DIR",
                        help="input folder(s), searched recursively for images")
    parser.add_argument("-l", dest="list_file", metavar="LIST_FILE",
                        help="text file with one image path per line, or a TSV/CSV with columns image, "
                             "anatomy_mask, anonymization_mask (see below)")
    parser.add_argument("--anatomy_masks", metavar="DIR",
                        help="folder of anatomy masks (mask > 0 = anatomy), matched to images as described below")
    parser.add_argument("--anonymization_masks", metavar="DIR",
                        help="folder of anonymization masks (mask > 0 = defaced/anonymised voxels, label 2)")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, metavar="ID",
                        help="nnU-Net dataset ID (1..999); must not be used by a dataset of another name")
    parser.add_argument("-n", dest="dataset_name", required=True, metavar="NAME",
                        help="dataset name: the output is $nnUNet_raw/Dataset<ID:03d>_<NAME>")
    parser.add_argument("-np", dest="num_processes", type=int, default=default_num_processes(), metavar="N",
                        help="number of worker processes (default: min(8, CPU count) = %(default)s)")
    parser.add_argument("--modality", default="MRI", metavar="NAME",
                        help="channel name written to dataset.json (default: %(default)s)")
    parser.add_argument("--min_extent_mm", type=float, default=16.0, metavar="MM",
                        help="reject images whose field of view (voxels x spacing) is below this along any axis "
                             "(default: %(default)s)")
    parser.add_argument("--fix_bad_spacing", action="store_true",
                        help="ingest images whose header spacing (NIfTI pixdim, NRRD spacings/space directions, "
                             "MetaImage ElementSpacing) is zero, negative or not finite, with the spacing ITK reads "
                             "for them (zero and NaN become 1 mm, a negative one its absolute value); each correction "
                             "is listed in nnssl_ingest_summary.json under 'corrected'. Without it such images are "
                             "rejected. Files ITK cannot read at all stay rejected")
    parser.add_argument("-v", dest="verbose", action="store_true", help="print one line per image")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``nnssl_ingest``; exit code 0 when the dataset has cases, 1 otherwise or on an error, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.input_dirs and args.list_file is None:
        parser.error("give input folders with -i and/or a list file with -l")
    if args.num_processes < 1:
        parser.error("-np must be at least 1")
    return run_user_command("nnssl_ingest", partial(run, args))


def run(args: argparse.Namespace) -> int:
    report = ingest(args.dataset_id, args.dataset_name, args.input_dirs, args.list_file, args.anatomy_masks,
                    args.anonymization_masks, args.num_processes, args.modality, args.min_extent_mm, args.verbose,
                    fix_bad_spacing=args.fix_bad_spacing)
    print(report.describe())
    if report.num_cases == 0:
        print("nnssl_ingest: error: the dataset has no usable cases; see the reasons above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
