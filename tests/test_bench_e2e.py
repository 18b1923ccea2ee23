"""scripts/bench_e2e.py's figures and trainer command. The script itself builds a dataset and trains, so it is
checked by running it (`MODEL=tiny STAGES=e2e bash scripts/gpu_bench.sh`, docs/performance.md), not here."""
import importlib.util
import os

import pytest

from configs import stt_dfew

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench_e2e(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, 'scripts'))  # its `import bench_train`
  spec = importlib.util.spec_from_file_location('bench_e2e', os.path.join(REPO, 'scripts', 'bench_e2e.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # defines no flags: they are defined only when run as a script
  return module


def test_trainer_clips_per_second_leave_out_the_first_interval_and_evaluation(bench_e2e):
  records = [{'split': 'train', 'step': 5, 'wall_time': 100.0},  # after compiling: where the count starts
             {'split': 'train', 'step': 10, 'wall_time': 101.0},
             {'split': 'train', 'step': 15, 'wall_time': 103.0},
             {'split': 'train', 'step': 20, 'wall_time': 104.0},
             {'split': 'test', 'step': 20, 'wall_time': 110.0}]
  figures = bench_e2e.trainer_throughput(records, batch_size=16)
  assert figures['clips_per_s'] == pytest.approx(15 * 16 / 4)
  assert (figures['from_step'], figures['to_step'], figures['seconds']) == (5, 20, 4.0)
  assert figures['interval_clips_per_s'] == pytest.approx({'min': 40.0, 'median': 80.0, 'max': 80.0})
  with pytest.raises(ValueError, match='2 train records'):
    bench_e2e.trainer_throughput(records[:2], batch_size=16)


def settings(**changes):
  return {'model': 'tiny', 'dataset': 'dfew/fold1_px32', 'dtype': 'bfloat16', 'batch_size': 128, 'steps': 30,
          'log_every': 5, 'progress_bar': True, 'image_size': 32, 'prefetch': 0, 'compilation_cache': '', **changes}


def test_trainer_command_overrides_fields_of_the_stt_config(bench_e2e):
  command = bench_e2e.trainer_command(settings(prefetch=6), '/data/tfds', '/runs/e2e', num_threads=16, num_workers=12)
  assert command[1:5] == ['-m', 'dferjax.main', '--config=configs/stt_dfew.py', '--workdir=/runs/e2e']
  overrides = dict(arg[len('--config.'):].split('=', 1) for arg in command if arg.startswith('--config.'))
  assert {'dataset.name': 'dfew/fold1_px32', 'dataset.data_dir': '/data/tfds', 'init_from.backbone': 'none',
          'steps_per_epoch': '30', 'num_epochs': '1', 'input.num_threads': '16', 'input.num_workers': '12',
          'input.prefetch': '6',
          'model.embed_dim': '32', 'input.sampler.num_segments': '2'}.items() <= overrides.items()
  config = stt_dfew.get_config()
  for name in overrides:  # each names a field of the config: the trainer would refuse a misspelt one
    node = config
    for part in name.split('.'):
      node = node[part]
  paper = bench_e2e.trainer_command(settings(model='paper'), '/data/tfds', '/runs/e2e', num_threads=0)
  assert not [arg for arg in paper if arg.startswith(('--config.model.', '--config.input.num_threads', '--config.input.num_workers',
                                                      '--config.input.prefetch'))]  # the config's own


def test_device_figure_only_from_the_same_model_batch_and_options(bench_e2e):
  result = {'dtype': 'bfloat16', 'batch_size': 128, 'dferjax': {'train': {'clips_per_s': 1950.0}}}
  report = {'settings': {'model_name': 'stt', 'model': 'paper', 'attention_impl': 'xla'}, 'results': [result]}
  assert bench_e2e.device_figure(report, settings(model='paper')) == (1950.0, '')
  assert bench_e2e.device_figure(report, settings())[0] is None  # a tiny run reads no paper figure
  assert bench_e2e.device_figure(report, settings(model='paper', batch_size=32))[0] is None
  pallas = {**report, 'settings': {**report['settings'], 'attention_impl': 'pallas'}}
  assert "['attention_impl']" in bench_e2e.device_figure(pallas, settings(model='paper'))[1]
