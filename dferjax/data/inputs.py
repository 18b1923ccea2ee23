"""What a run reads, from its config: the data sources and the grain iterators the trainer and `evaluate` use.

    config.input.sampler = dict(name='segments', num_segments=8, frames_per_segment=2, short_clip_fallback='zeros')
    config.input.transforms = {}  # {name: {fields}} of pipeline.CLIP_TRANSFORMS, e.g. {'shuffle_snippets': {}}

A config whose `dataset` holds a `synthetic` block (the demo) writes and builds the synthetic dataset first, under
`<data_dir>/synthetic/` (`synthetic_order_free/` for the order-free motion set), so the demo's `dfew/fold1_px48`
never takes the place of a real build of that name, nor one motion set the other's.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from dferjax import distributed, sharding
from dferjax.data import clip_list, datasets, image_list, pipeline


SYNTHETIC_SUBDIR = 'synthetic'


def data_dir(config: ml_collections.ConfigDict) -> str:
  """Where `config.dataset` is built: the synthetic demo data in a subfolder of its own, as it shares the real
  datasets' builder names."""
  distributed.check_posix_path(config.dataset.data_dir, 'config.dataset.data_dir', 'data')
  if 'synthetic' in config.dataset:
    motions = config.dataset.synthetic.get('motions', 'time_reversed')  # runs saved before motion sets
    subdir = SYNTHETIC_SUBDIR if motions == 'time_reversed' else f'{SYNTHETIC_SUBDIR}_{motions}'
    return os.path.join(config.dataset.data_dir, subdir)
  return config.dataset.data_dir


def data_sources(config: ml_collections.ConfigDict):
  """(train, eval) random-access sources of `config.dataset`."""
  if 'synthetic' in config.dataset:
    if jax.process_index() == 0:
      from dferjax.data import synthetic  # pylint: disable=import-outside-toplevel
      synthetic.ensure_built(config.dataset.name, data_dir(config), **config.dataset.synthetic)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices('synthetic dataset ready')
  train_source = split_source(config, config.dataset.train_split)
  eval_source = split_source(config, config.dataset.eval_split)
  if jax.process_index() == 0:
    note_enlarged_frames(config, train_source)
    if config.dataset.name == clip_list.NAME and (shared := clip_list.shared_clips(train_source, eval_source)):
      # A list of one's own split by hand: a test clip trained on makes the evaluation meaningless.
      print(f'warning: {len(shared)} of the {len(eval_source)} clips of the {config.dataset.eval_split} list are '
            f'also in the {config.dataset.train_split} list (first: {shared[0]}): the evaluation is not on '
            'held-out clips', flush=True)
  return train_source, eval_source


def note_enlarged_frames(config: ml_collections.ConfigDict, source) -> None:
  """Prints a note when the stored frames are smaller than config.input.image_size: every frame is then enlarged
  and has less detail than a build at that size has (say a px112 build under a 224-px model)."""
  if not len(source):
    return
  record = source[0]
  stored = min(pipeline.decode_frames(record['frames'][:1], [0], record.get('clip_id')).shape[1:3])
  wanted = config.input.image_size
  if stored < wanted:
    print(f'note: {config.dataset.name} stores {stored}-px frames and config.input.image_size={wanted} enlarges each '
          f'{wanted / stored:.2f}x (frames stored at {wanted} px or more keep more detail: a px{wanted} build)',
          flush=True)


def split_source(config: ml_collections.ConfigDict, split: str):
  """One split of `config.dataset`, without the clips shorter than `config.dataset.min_frames` (if > 1)."""
  if config.dataset.name == image_list.NAME:  # single images as one-frame clips (AEN's RAF-DB pre-training)
    source = image_list.split_source(config.dataset, split)
  elif config.dataset.name == clip_list.NAME:  # frame folders named in list files, no build
    source = clip_list.split_source(config, split)
  else:
    source = datasets.data_source(config.dataset.name, split, data_dir(config))
  if config.dataset.min_frames > 1:
    total = len(source)
    source, left_out = datasets.drop_short_clips(source, config.dataset.min_frames)
    if jax.process_index() == 0:
      print(f'{config.dataset.name} {split}: left out {left_out} of {total} clips with fewer than '
            f'{config.dataset.min_frames} frames (config.dataset.min_frames)', flush=True)
  return source


def train_iterator(config: ml_collections.ConfigDict, source, local_batch_size: int, start_step: int = 0):
  """This host's slice of every global batch from global batch `start_step` on (the same clips whatever the
  process count); its state goes into every checkpoint."""
  return pipeline.train_iterator(
      source, sampler=config.input.sampler.to_dict(), augment=config.input.augment,
      image_size=config.input.image_size, batch_size=local_batch_size, seed=config.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      class_balanced=config.input.class_balanced, num_threads=config.input.num_threads,
      prefetch=config.input.prefetch, transforms=config.input.transforms.to_dict(),
      num_workers=config.input.num_workers, start_batch=start_step)


def eval_reader(config: ml_collections.ConfigDict, source) -> pipeline.EvalReader:
  """This host's share of the eval split, one pass per `for batch in reader:` (padding rows masked). With
  `config.input.num_workers` > 0 the reader keeps that many worker processes for the run (close() stops them):
  they read the next pass ahead while the model trains."""
  return pipeline.EvalReader(
      source, sampler=config.input.sampler.to_dict(), image_size=config.input.image_size,
      batch_size=sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size'),
      shard_index=jax.process_index(), shard_count=jax.process_count(), num_threads=config.input.num_threads,
      transforms=config.input.transforms.to_dict(), num_workers=config.input.num_workers)
