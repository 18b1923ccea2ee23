"""Build the DFEW / AFEW / FERV39K TFDS datasets (array_record, no TensorFlow, no Apache Beam).

  python scripts/build_dataset.py --dataset dfew --manual_dir /data/DFEW --data_dir ~/tensorflow_datasets
  python scripts/build_dataset.py --dataset dfew --manual_dir /tmp/dfew_synth --data_dir /tmp/tfds \
      --configs fold1 --image_size 48 --workers 2
  python scripts/build_dataset.py --dataset afew --manual_dir /data/AFEW --data_dir ~/tensorflow_datasets \
      --configs px112

Then read with `dferjax.data.datasets.data_source('dfew/fold1_px48', 'train', data_dir)`.
"""
import argparse
import os

from dferjax import cli
from dferjax.data import build
from dferjax.data.datasets import DATASETS


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--dataset', required=True, choices=DATASETS)
  parser.add_argument('--manual_dir', required=True, help='the unzipped release (see the builder\'s layout)')
  parser.add_argument('--data_dir', required=True, help='TFDS data dir to write <dataset>/<config>/<version>/ into')
  parser.add_argument('--configs', default=None,
                      help='comma-separated config names (fold1,fold3_px224 | px112); default: all predefined')
  parser.add_argument('--image_size', type=int, default=None,
                      help='frame size for every config (DFEW without --configs: fold1..fold5 at this size)')
  parser.add_argument('--workers', type=int, default=os.cpu_count(), help='CPU cores to use (processes x threads)')
  parser.add_argument('--overwrite', action='store_true', help='rebuild configs that are already built')
  parser.add_argument('--verbose', action='store_true', help='show the traceback of an expected error')
  args = parser.parse_args(argv)
  # Bad input: one message naming the file, exit 1, no traceback (--verbose keeps it).
  reports = cli.run(lambda: build.build(args.dataset, args.manual_dir, args.data_dir, args.configs,
                                        image_size=args.image_size, workers=args.workers, overwrite=args.overwrite),
                    verbose=args.verbose)
  print(build.format_summary(reports))


if __name__ == '__main__':
  main()
