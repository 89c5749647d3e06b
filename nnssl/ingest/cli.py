"""``nnssl_ingest`` command line: a thin argparse wrapper around ``nnssl.ingest.ingest``."""

import argparse
import sys
from functools import partial
from typing import List, Optional

from nnssl.ingest.discover import IMAGE_EXTENSIONS
from nnssl.ingest.metadata import MATCH_MODES, MetadataOptions
from nnssl.ingest.metadata_table import FIELDS, OPENMIND_COLUMNS, column_option
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

metadata table (--metadata TABLE, CSV or TSV; .tsv/.csv by extension, else a tab in the header means TSV):
  one row per image; the column options name its columns. The defaults read OpenMind's openneuro_metadata.csv:
  image_path, modality, image_quality_score; without a subject/session column both come from the image path
  (subject: the path up to its sub-* folder, e.g. ds000001/sub-01; session: the ses-* folder below it).
  Rows are matched to images by --metadata_match:
    path (default): the row's path relative to an input folder (-i DIR: DIR/<row> is the image), or absolute
    name: the row's file name against the image's file name, anywhere
  A row matching several images, or several rows matching one image, is ambiguous and excludes the image. With
  --metadata, images without a row are excluded and rows without an image are listed; neither stops the run.
  Subject, session, modality and quality of every case go to nnssl_case_metadata.json in the dataset.
  The exclude list (--exclude_list FILE: one entry per line, # comments) is matched the same way.
  Every excluded image is listed with its reason in nnssl_ingest_summary.json under 'excluded'.
  OpenMind's image_quality_score is lower = better: keep good images with --max_quality (its trainers use 1.5-3.5).

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
    parser.add_argument("--channel_name", default="MRI", metavar="NAME",
                        help="channel name written to dataset.json (default: %(default)s; was --modality NAME "
                             "before --modality became a filter)")
    parser.add_argument("--metadata", metavar="TABLE",
                        help="CSV/TSV table with subject, session, modality and quality score per image (see below)")
    for field_name in FIELDS:
        default = OPENMIND_COLUMNS[field_name]
        parser.add_argument(column_option(field_name), metavar="COLUMN",
                            help=f"column of the {field_name} in --metadata (default: "
                                 + (f"{default})" if default else "from the image path, see below)"))
    parser.add_argument("--metadata_match", choices=MATCH_MODES, default="path",
                        help="how table rows and exclude-list entries find their image (default: %(default)s)")
    parser.add_argument("--modality", nargs="+", metavar="MODALITY",
                        help="keep only images whose --metadata modality is one of these (e.g. T1w T2w FLAIR)")
    parser.add_argument("--min_quality", type=float, metavar="X",
                        help="keep only images whose --metadata quality score is at least X")
    parser.add_argument("--max_quality", type=float, metavar="X",
                        help="keep only images whose --metadata quality score is at most X (OpenMind: lower = better)")
    parser.add_argument("--exclude_list", metavar="FILE",
                        help="text file of images to leave out, one per line (matched like table rows)")
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
    if args.metadata is None:
        if args.modality:
            parser.error(f"--modality {' '.join(args.modality)} keeps only images of these modalities and needs "
                         f"--metadata TABLE; the channel name in dataset.json is now set with --channel_name NAME")
        needing = [option for option in ["--min_quality", "--max_quality"] + [column_option(f) for f in FIELDS]
                   if getattr(args, option[2:]) is not None]
        if needing:
            parser.error(f"{', '.join(needing)} need(s) --metadata TABLE")
    return run_user_command("nnssl_ingest", partial(run, args))


def run(args: argparse.Namespace) -> int:
    report = ingest(args.dataset_id, args.dataset_name, args.input_dirs, args.list_file, args.anatomy_masks,
                    args.anonymization_masks, args.num_processes, args.channel_name, args.min_extent_mm, args.verbose,
                    fix_bad_spacing=args.fix_bad_spacing, metadata=metadata_options(args))
    print(report.describe())
    if report.num_cases == 0:
        print("nnssl_ingest: error: the dataset has no usable cases; see the reasons above.", file=sys.stderr)
        return 1
    return 0



def metadata_options(args: argparse.Namespace) -> Optional[MetadataOptions]:
    """The selection the command asks for; None when it asks for none (every image is ingested)."""
    if args.metadata is None and args.exclude_list is None:
        return None
    named = {f: getattr(args, column_option(f)[2:]) for f in FIELDS}
    columns = {f: named[f] if named[f] is not None else OPENMIND_COLUMNS[f] for f in FIELDS}
    return MetadataOptions(args.metadata, columns, [f for f in FIELDS if named[f] is not None], args.metadata_match,
                           args.modality or (), args.min_quality, args.max_quality, args.exclude_list)


if __name__ == "__main__":
    sys.exit(main())
