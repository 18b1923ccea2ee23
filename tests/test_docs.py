"""What the README promises a new user holds (issue 18): install extras, one backbone path per checkpoint, and a
real-data table whose commands exist and whose STT times follow from the measured step times."""
import glob
import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
  with open(os.path.join(REPO, *path)) as f:
    return f.read()


def _section(text, title):
  start = text.index(f'## {title}\n')
  return text[start:text.index('\n## ', start + 1)]


def test_accelerator_and_tensorboard_extras_are_installable_and_documented():
  extras = tomllib.loads(_read('pyproject.toml'))['project']['optional-dependencies']
  assert any(spec.startswith('jax[cuda13]') for spec in extras['cuda'])
  assert any(spec.startswith('jax[tpu]') for spec in extras['tpu'])
  assert any(spec.startswith('tensorboard') for spec in extras['tensorboard'])
  install = _section(_read('README.md'), 'Install')
  for extra in ('cuda', 'tpu', 'tensorboard'):
    assert f"pip install -e '.[{extra}]'" in install
  assert 'python -c "import jax; print(jax.default_backend(), jax.devices())"' in install


def test_one_backbone_path_per_checkpoint_across_readme_and_configs():
  canonical = {'weights/resnet18_ms1m': 'Resnet18_MS1M_pytorch.pth.tar',
               'weights/resnet18_ferplus': 'Resnet18_FER+_pytorch.pth.tar'}
  texts = {'README.md': _read('README.md'), **{os.path.relpath(path, REPO): _read(path)
                                              for path in glob.glob(os.path.join(REPO, 'configs', '*.py'))}}
  for name, text in texts.items():
    for path in re.findall(r'init_from\.backbone=(weights/[\w+-]+)', text):
      assert path in canonical, f'{name}: {path} is not one of {sorted(canonical)}'
  table = _section(texts['README.md'], 'Pretrained backbone')
  for path, file_name in canonical.items():
    assert re.search(rf'\| `{re.escape(file_name)}` \| [^|]*Emotion-FAN[^|]* \| `{path}` \|', table), path


def test_real_data_table_commands_exist_and_stt_times_follow_from_the_measured_steps():
  section = _section(_read('README.md'), 'What to expect on real data')
  rows = [line for line in section.splitlines() if line.startswith('| ') and '`python' in line]
  assert len(rows) >= 9
  for row in rows:
    for config in re.findall(r'--config (configs/\w+\.py)', row):
      assert os.path.isfile(os.path.join(REPO, config)), row
  performance = _read('docs', 'performance.md')
  train, eval_ = (float(x.replace(',', '')) for x in
                  re.search(r'\| fp32 \| 32 \| ([\d,]+) \|[^|]*\|[^|]*\| ([\d,]+) \|', performance).groups())
  clips_per_epoch = 9356 // 32 * 32  # DFEW fold 1, drop_last
  minutes = 100 * (clips_per_epoch / train + 2341 / eval_) / 60
  stt_row = next(row for row in rows if row.startswith('| STT, DFEW'))
  assert '54.58 / 66.65' in stt_row and f'{round(minutes)} min float32' in stt_row
