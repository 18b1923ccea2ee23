"""EST: paper-size parameters (Tab. 5: 42.78 M with the SSOP head, 34.37 M without) and MACs (63.89 G) from shapes,
the permutation travelling as a batch field into the model, the order head as a metric head, end to end through
the trainer. PyTorch parity and the order property of the two position modes: test_est_parity.py."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax import configlib, summary, train
from dferjax.data import pipeline, sampling
from dferjax.models.est import EST, sinusoid_table

TINY = dict(num_frames=14, num_snippets=7, backbone_width=8, hidden_dim=64, num_encoder_layers=1,
            num_decoder_layers=1, classifier_dims=(16, 8), order_head_dims=(32, 16))


@pytest.mark.parametrize('ssop, want', [(True, 42_775_761), (False, 34_374_343)])
def test_paper_sized_parameter_counts(ssop, want):
  model = EST(num_classes=7, ssop=ssop)
  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 35, 224, 224, 3), jnp.float32))
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == want
  assert round(want / 1e6, 2) == (42.78 if ssop else 34.37)


def test_paper_config_macs_match_tab_5():
  """Our count is convolutions and matmuls of the evaluation forward (backbone once, the transformer twice);
  the paper's 63.89 G also counts BN, ReLU and pooling (ptflops)."""
  result = summary.summarize(configlib.load_config('configs/est_dfew.py'))
  assert result['params'] == 42_775_761
  assert result['gmacs_per_clip'] == pytest.approx(63.89, rel=0.005)


def test_sinusoid_table():
  table = sinusoid_table(7, 8)
  position, index = 3, 5  # odd index: cos(pos / 10000^(2 * 2 / 8))
  np.testing.assert_allclose(table[position, index], np.cos(position / 10000 ** (4 / 8)), rtol=1e-6)
  np.testing.assert_allclose(table[position, 4], np.sin(position / 10000 ** (4 / 8)), rtol=1e-6)


def test_outputs_and_the_permutation_input():
  model = EST(num_classes=7, **TINY)
  video = jnp.asarray(np.random.default_rng(0).random((3, 14, 32, 32, 3)), jnp.float32)
  permutation = jnp.asarray([0, 4, 9], jnp.int32)
  variables = jax.jit(lambda key: model.init(key, video, train=False))(jax.random.key(0))  # one compile, not per op
  evaluate = jax.jit(lambda v, p: model.apply(v, video, p, train=False))
  logits, aux = evaluate(variables, permutation)
  assert logits.shape == (3, 7) and aux['order_logits'].shape == (3, 10)
  # Evaluation classifies the ordered clip: the permutation moves only the order logits.
  other, other_aux = evaluate(variables, jnp.asarray([1, 2, 3], jnp.int32))
  np.testing.assert_allclose(other, logits, atol=1e-6)
  assert np.abs(np.asarray(other_aux['order_logits']) - np.asarray(aux['order_logits'])).max() > 1e-4
  assert set(model.metric_heads()) == {'order'} and EST(num_classes=7, ssop=False).metric_heads() == {}
  with pytest.raises(ValueError, match=r'EST expects video \[batch, 14'):
    model.apply(variables, video[:, :10], permutation, train=False)
  with pytest.raises(ValueError, match="snippet_positions='time'"):
    EST(num_classes=7, snippet_positions='time', **TINY).apply(variables, video, permutation, train=False)


def test_draw_permutation_transform_and_missing_field_error():
  transform, = pipeline.make_clip_transforms({'draw_permutation': {}})
  video = np.zeros((14, 4, 4, 3), np.uint8)
  drawn = {int(transform.random_map({'video': video}, np.random.default_rng(seed))['permutation'])
           for seed in range(60)}
  assert drawn == set(range(len(sampling.EST_PERMUTATIONS)))
  config = configlib.load_config('configs/est_dfew.py')
  with config.unlocked():
    config.input.transforms = {}
  model = train.build_model(config)
  with pytest.raises(ValueError, match=r"takes the batch fields \['permutation'\].*config.input.transforms"):
    train.model_inputs(model, {'video': None, 'label': None, 'mask': None})


def test_ablation_and_code_arguments():
  ablation = configlib.load_config('configs/est_dfew.py', 'ssop=false')
  assert (ablation.model.ssop, ablation.loss.name, dict(ablation.input.transforms)) == (False, 'cross_entropy', {})
  assert train.model_inputs(train.build_model(ablation), {'video': None}) == {}  # no permutation needed
  code = configlib.load_config('configs/est_dfew.py', 'positions=original,fold=3')
  assert (code.model.snippet_positions, code.dataset.name) == ('original', 'dfew/fold3_px224')
  afew = configlib.load_config('configs/est_afew.py')
  assert (afew.dataset.name, afew.dataset.eval_split) == ('afew/px224', 'validation')
