"""Issue 15, parts 1 and 4: the validation hold-out (stratified, chosen by clip id, never trained on, selecting a
checkpoint), both protocols in results.json and the fold table, the environment record and the dataset-changed
warning. One tiny training run serves the end-to-end checks."""
import collections
import json
import os
import warnings

import numpy as np
import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import environment, reports, train, writers
from dferjax.data import datasets, inputs, validation
from test_contract import build_synthetic
from test_train import tiny_config

CLASS_NAMES = ('happy', 'sad', 'neutral', 'angry', 'surprise', 'disgust', 'fear')


class ListSource:
  """Records with ids and labels only, in any order."""

  def __init__(self, records):
    self.records = list(records)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


def fake_records(counts):
  return [{'clip_id': f'{label}_{i:03d}'.encode(), 'label': label} for label, count in enumerate(counts)
          for i in range(count)]


def holdout_config(fraction=0.1, seed=0):
  config = tiny_config('')
  with config.unlocked():
    config.validation.fraction, config.validation.seed = fraction, seed
  return config


def ids_of(source):
  return {source[i]['clip_id'].decode() for i in range(len(source))}


def test_held_out_clips_are_stratified_and_do_not_depend_on_record_order_or_shards(tmp_path):
  counts = [40, 25, 10, 3, 2, 61, 12]
  records = fake_records(counts)
  train_part, held = validation.split(holdout_config(0.1), ListSource(records), str(tmp_path))
  per_class = collections.Counter(held[i]['label'] for i in range(len(held)))
  assert [per_class[label] for label in range(7)] == [4, 2, 1, 1, 1, 6, 1]  # round(10 %), at least one
  shuffled = [records[i] for i in np.random.default_rng(1).permutation(len(records))]
  train_again, held_again = validation.split(holdout_config(0.1), ListSource(shuffled), None)
  assert ids_of(held_again) == ids_of(held) and ids_of(train_again) == ids_of(train_part)
  assert not ids_of(train_part) & ids_of(held) and len(train_part) + len(held) == len(records)
  for shard_count in (1, 2, 3):  # each host trains on its slice of the same training part (pipeline's [i::n])
    shards = [train_again.indices[index::shard_count] for index in range(shard_count)]
    seen = {train_again.source[int(i)]['clip_id'].decode() for shard in shards for i in shard}
    assert seen == ids_of(train_part)
  _, other_seed = validation.split(holdout_config(0.1, seed=1), ListSource(records), None)
  assert ids_of(other_seed) != ids_of(held)
  written = json.loads((tmp_path / validation.CLIPS_FILENAME).read_text())
  assert written['num_held_out'] == len(held) and written['fraction'] == 0.1
  assert sorted(sum(written['clips'].values(), [])) == sorted(ids_of(held))
  assert validation.split(holdout_config(0.0), ListSource(records), None)[1] is None  # off


def test_selected_protocol_takes_the_test_epoch_of_the_best_hold_out_epoch():
  def record(split, step, war):
    return {'split': split, 'step': step, 'epoch': step, 'uar': war, 'war': war, 'per_class': {}, 'confusion': []}
  records = [record('test', 1, 0.5), record('heldout', 1, 0.6), record('test', 2, 0.9), record('heldout', 2, 0.4),
             record('test', 3, 0.7), record('heldout', 3, 0.8)]
  assert reports.select_record(records, 'best', 'war', 'test')['step'] == 2  # the papers'
  selected = reports.select_record(records, 'selected', 'war', 'test')
  assert (selected['step'], selected['war'], selected['selected_on']['war']) == (3, 0.7, 0.8)
  assert reports.select_record([r for r in records if r['split'] == 'test'], 'selected', 'war', 'test') is None


def test_a_run_saved_before_config_validation_still_resumes_and_a_changed_hold_out_does_not():
  current = checkpoint_lib.config_to_json(holdout_config(0.0))
  saved = json.loads(json.dumps(current))
  del saved['validation']
  checkpoint_lib.check_resumable(current, saved, 'old_run')
  with pytest.raises(ValueError, match=r'config\.validation\.fraction=0\.1'):
    checkpoint_lib.check_resumable(checkpoint_lib.config_to_json(holdout_config(0.1)), saved, 'old_run')


def write_fake_fold(workdir, fold, wars, seed=0, fraction=0.1):
  """config.json and metrics.jsonl of a finished fold run: `wars` = [(test WAR, hold-out WAR)] per epoch."""
  os.makedirs(workdir)
  config = {'seed': seed, 'dataset': {'name': f'dfew/fold{fold}'}, 'validation': {'fraction': fraction, 'seed': 3}}
  (workdir / 'config.json').write_text(json.dumps(config))
  writer = writers.MetricWriter(str(workdir), tensorboard=False)
  for epoch, (test_war, heldout_war) in enumerate(wars, 1):
    for split, war in (('test', test_war), ('heldout', heldout_war)):
      if war is not None:
        writer.write(split, epoch, epoch, {'uar': war, 'war': war, 'per_class': dict.fromkeys(CLASS_NAMES, war),
                                           'confusion': [[1]], 'num_clips': 10})
  writer.close()


def test_fold_table_shows_both_protocols_their_means_and_the_seeds(tmp_path):
  write_fake_fold(tmp_path / 'fold1', 1, [(0.5, 0.7), (0.9, 0.2)], seed=4)
  write_fake_fold(tmp_path / 'fold2', 2, [(0.6, 0.1), (0.7, 0.3)], seed=5)
  workdirs = [tmp_path / 'fold1', tmp_path / 'fold2']
  text = reports.fold_report(workdirs, CLASS_NAMES, fold_names=['fold1', 'fold2'])
  papers, honest = text.split('\n\n')
  assert papers.startswith("best epoch on test (papers' protocol)") and honest.startswith('selected on validation')
  assert '| 80.00 |' in papers.splitlines()[-2]  # mean of 90 and 70
  assert '| 60.00 |' in honest.splitlines()[-2]  # mean of 50 (fold 1, epoch 1) and 70 (fold 2, epoch 2)
  lines = papers.splitlines()
  assert lines[1].endswith('| seed |') and lines[3].endswith('|    4 |') and lines[4].endswith('|    5 |')
  assert '10 %, seed 3' in honest
  write_fake_fold(tmp_path / 'fold3', 3, [(0.5, None)], fraction=0.0)
  text = reports.fold_report([tmp_path / 'fold3'], CLASS_NAMES, fold_names=['fold3'])
  assert 'selected on validation: not available' in text


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return build_synthetic(tmp_path_factory.mktemp('synthetic_holdout'), 'fold1_px32')


@pytest.fixture(scope='module')
def holdout_run(tmp_path_factory, data_dir):
  """A 3-epoch tiny run holding out a quarter of each class (1 of 4 clips), keeping only the latest checkpoint
  plus the protocols' two best ones; records the clip ids of every source the trainer made a train iterator of."""
  workdir = tmp_path_factory.mktemp('holdout_run')
  trained_on = []
  original = inputs.train_iterator

  def recording_iterator(config, source, local_batch_size, *args, **kwargs):
    trained_on.append(ids_of(source))
    return original(config, source, local_batch_size, *args, **kwargs)
  config = tiny_config(data_dir, **{'validation.fraction': 0.25, 'keep_checkpoints': 1})
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(inputs, 'train_iterator', recording_iterator)
    train.train_and_evaluate(config, str(workdir))
  return workdir, trained_on, config


def test_training_never_sees_a_held_out_clip(holdout_run, data_dir):
  workdir, trained_on, config = holdout_run
  held = json.loads((workdir / validation.CLIPS_FILENAME).read_text())
  held_ids = set(sum(held['clips'].values(), []))
  assert len(held['clips']) == 7 and all(len(ids) == 1 for ids in held['clips'].values())
  all_train = ids_of(datasets.data_source(config.dataset.name, 'train', data_dir))
  assert trained_on == [all_train - held_ids] and held_ids < all_train


def test_the_selected_checkpoint_is_the_best_on_validation_and_both_protocols_are_reported(holdout_run):
  workdir, _, config = holdout_run
  records = writers.read_records(workdir)
  heldout = [r for r in records if r['split'] == 'heldout']
  tests = {r['step']: r for r in records if r['split'] == 'test'}
  assert [r['epoch'] for r in heldout] == [1, 2, 3] and all(r['num_clips'] == 7 for r in heldout)
  best_heldout = max(reversed(heldout), key=lambda r: r['war'])  # the latest on ties
  results = json.loads((workdir / 'results.json').read_text())
  chosen = results['protocols']['validation']
  assert chosen['step'] == best_heldout['step'] and chosen['war'] == tests[chosen['step']]['war']
  assert chosen['selected_on']['war'] == best_heldout['war']
  assert results['protocols']['papers']['war'] == max(r['war'] for r in tests.values())
  assert results['seeds'] == {'seed': 0, 'validation_fraction': 0.25, 'validation_seed': 0}
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), read_only=True)
  assert chosen['step'] in checkpoints.all_steps()  # kept although keep_checkpoints=1
  checkpoints.close()
  from dferjax import evaluate
  again = evaluate.evaluate_checkpoint(str(workdir), 'selected')
  assert again['step'] == chosen['step'] and again['confusion'] == tests[chosen['step']]['confusion']
  table = reports.fold_report([workdir], config.class_names, fold_names=['fold1'])
  assert "best epoch on test (papers' protocol)" in table and 'selected on validation, by hold-out WAR' in table


def test_the_environment_record_names_versions_commit_devices_and_the_dataset_build(holdout_run):
  workdir, _, _ = holdout_run
  runs = environment.read(str(workdir))
  assert len(runs) == 1
  run = runs[0]
  assert {'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets', 'numpy'} <= set(
      name for name, version in run['packages'].items() if version)
  assert run['git'] is None or (len(run['git']['commit']) == 40 and isinstance(run['git']['dirty'], bool))
  assert run['devices']['device_count'] >= 1 and run['devices']['process_count'] == 1 and run['devices']['device_kind']
  assert run['seed'] == 0 and run['validation'] == {'fraction': 0.25, 'seed': 0} and run['start_step'] == 0
  dataset = run['dataset']
  assert dataset['name'] == 'dfew/fold1_px32' and dataset['records'] == {'test': 7, 'train': 28}
  assert dataset['build']['records'] == {'test': 7, 'train': 28} and len(dataset['build']['fingerprint']) == 16
  assert len(dataset['files_fingerprint']) == 16


def test_evaluate_warns_when_the_dataset_differs_from_the_one_trained_on(holdout_run, tmp_path):
  workdir, _, config = holdout_run
  with warnings.catch_warnings():
    warnings.simplefilter('error', environment.DatasetChangedWarning)
    assert environment.warn_if_dataset_changed(str(workdir), config) == []
  from dferjax.data import build, synthetic
  synthetic.write_dfew(str(tmp_path / 'manual'), clips_per_class=6, seed=1)  # another build of the same name
  build.build('dfew', manual_dir=str(tmp_path / 'manual'), data_dir=str(tmp_path / 'tfds'), configs=['fold1_px32'])
  from dferjax import evaluate
  with pytest.warns(environment.DatasetChangedWarning, match='records per split.*build fingerprint'):
    evaluate.evaluate_checkpoint(str(workdir), 'latest', data_dir=str(tmp_path / 'tfds'))
