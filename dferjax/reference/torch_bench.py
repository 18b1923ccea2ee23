"""The PyTorch side of scripts/bench_train.py: a model's transcription trained and evaluated eagerly or under
`torch.compile`, holding the flax initial weights, with dferjax's optimizer, loss and precision policy.

Apart from the script so that only its torch workers import torch. A model joins the benchmark with a builder
`(config, flax variables) -> torch.nn.Module` (its transcription with the weights copied in) whose forward takes
the video and the model's other batch fields (`model_inputs`, e.g. EST's permutation) by name and returns the
logits, or (logits, {name: auxiliary logits}) as dferjax's models do; the loop here is model-neutral. Matching
dferjax: the config's optimizer with coupled weight decay (SGD(momentum, weight_decay) = optax add_decayed_weights
+ sgd, Adam(weight_decay) = add_decayed_weights + adam), the config's loss on float32 logits, bf16 as AMP
autocast, float32 with TF32 allowed on GPU (XLA's default precision there).
"""
import dataclasses
import functools
import time
from typing import Any, Callable

import numpy as np
import torch

from dferjax import benchmarking, losses, train

MODES = ('eager', 'compile')


def torch_compact_loss(logits, labels, beta: float):
  """STT Eq. (17) in torch, as dferjax.losses.compact_softmax_cross_entropy: CE + beta/2 * symmetric KL between
  the softmax over the non-target logits and the uniform distribution over them. logits [b, C] -> [b]."""
  num_classes = logits.shape[-1]
  is_target = torch.nn.functional.one_hot(labels, num_classes).bool()
  non_target = logits.masked_fill(is_target, float('-inf'))
  non_target_probs = non_target.softmax(dim=-1)
  centre = non_target.max(dim=-1, keepdim=True).values.detach()
  shifted = (logits - centre).masked_fill(is_target, 0.0)
  symmetric_kl = ((non_target_probs - 1.0 / (num_classes - 1)) * shifted).masked_fill(is_target, 0.0).sum(dim=-1)
  return torch.nn.functional.cross_entropy(logits, labels, reduction='none') + 0.5 * beta * symmetric_kl


def torch_order_loss(logits, order_logits, labels, permutation, order_weight: float):
  """EST's loss as dferjax.losses.OrderLoss: CE(class logits, labels) + order_weight * CE(order logits, the
  permutation index) -> [b]."""
  cross_entropy = functools.partial(torch.nn.functional.cross_entropy, reduction='none')
  return cross_entropy(logits, labels) + order_weight * cross_entropy(order_logits, permutation)


def torch_loss(spec) -> Callable[[Any, Any], Any]:
  """`config.loss` as a per-example torch loss (logits, labels) -> [b]. Parsed by dferjax.losses.build_loss, so
  fields and defaults are dferjax's; only the losses of logits and labels alone have a transcription here (see
  torch_batch_loss for the ones reading auxiliary outputs or other batch fields)."""
  loss = losses.build_loss(spec)
  if isinstance(loss, losses.CompactLoss):
    return functools.partial(torch_compact_loss, beta=loss.beta)
  if isinstance(loss, losses.LabelSmoothing):  # optax.smooth_labels is torch's label_smoothing: (1 - a) y + a / C
    return functools.partial(torch.nn.functional.cross_entropy, reduction='none', label_smoothing=loss.smoothing)
  if isinstance(loss, losses.CrossEntropy):
    return functools.partial(torch.nn.functional.cross_entropy, reduction='none')
  raise ValueError(f'config.loss {dict(spec)} has no torch transcription of (logits, labels) in '
                   'dferjax.reference.torch_bench (torch_batch_loss has those of (logits, aux, batch))')


def torch_batch_loss(spec) -> Callable[[Any, dict, dict], Any]:
  """`config.loss` as dferjax's registered losses are called: (logits, aux {name: logits}, batch {field: tensor})
  -> [b]; the losses of logits and labels alone read batch['label']."""
  loss = losses.build_loss(spec)
  if isinstance(loss, losses.OrderLoss):
    return lambda logits, aux, batch: torch_order_loss(logits, aux['order_logits'], batch['label'],
                                                       batch['permutation'], loss.order_weight)
  if isinstance(loss, (losses.AENLoss, losses.AENPrototypeLoss)):  # on AEN's training outputs (torch_aen.AEN)
    from dferjax.reference import torch_aen  # pylint: disable=import-outside-toplevel
    aen_loss = torch_aen.paper_loss if isinstance(loss, losses.AENLoss) else torch_aen.prototype_loss
    fields = {field.name: getattr(loss, field.name) for field in dataclasses.fields(loss)}
    return lambda logits, aux, batch: aen_loss(aux, batch['label'], **fields)[0]
  per_label = torch_loss(spec)
  return lambda logits, aux, batch: per_label(logits, batch['label'])


def torch_optimizer(spec, parameters, num_epochs: int):
  """`config.optimizer` as dferjax.train.create_optimizer builds it, at the schedule's first-epoch learning rate
  (warm-up included; the benchmark's steps stay in that epoch): torch's SGD and Adam add weight_decay * w to the
  gradient before the update, as optax.add_decayed_weights does before sgd/adam."""
  learning_rate = float(train.learning_rate_schedule(spec, 1, num_epochs)(0))
  if spec.name == 'sgd':
    return torch.optim.SGD(parameters, lr=learning_rate, momentum=spec.momentum or 0.0,
                           weight_decay=spec.weight_decay)
  if spec.name == 'adam':
    return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=spec.weight_decay)
  raise ValueError(f"config.optimizer.name={spec.name!r} has no torch transcription: expected 'sgd' or 'adam'")


def _float(value):
  """Floating tensors (also inside dicts, e.g. AEN's features per level) as float32; integer ones as they are."""
  if isinstance(value, dict):
    return {name: _float(item) for name, item in value.items()}
  return value.float() if value.is_floating_point() else value


def split_outputs(outputs) -> tuple[Any, dict]:
  """A transcription's forward output -> (logits, {name: auxiliary outputs}), every floating tensor float32."""
  logits, aux = outputs if isinstance(outputs, tuple) else (outputs, {})
  return logits.float(), _float(aux or {})


def torch_fields(batch: dict, device) -> dict:
  """The batch's fields besides the video as tensors on `device`; integers as int64 (labels, indices)."""
  fields = {}
  for name, value in batch.items():
    if name != 'video':
      tensor = torch.from_numpy(np.asarray(value))
      fields[name] = (tensor.long() if np.issubdtype(value.dtype, np.integer) else tensor).to(device)
  return fields


def torch_input(video, channels_last: bool):
  """uint8 [b, t, h, w, 3] -> float [b, t, 3, h, w] in [0, 1]. The permuted view keeps NHWC memory, which is
  channels_last for the frames' convs once the model flattens (b, t); NCHW needs a copy."""
  video = video.permute(0, 1, 4, 2, 3).float() / 255
  return video if channels_last else video.contiguous()


class TorchBench:
  """One model's transcription on one device, `mode` 'eager' or 'compile', starting from the flax weights.

  build_model: (config, variables) -> the torch module holding `variables` (flax {'params', 'batch_stats'}).
  model_inputs: the batch fields the model takes besides the video (dferjax's `model_inputs`), passed by name.
  threads: intra-op threads on a CPU.
  """

  def __init__(self, build_model: Callable, variables: dict, mode: str, *, seed: int, channels_last: bool,
               compile_mode: str, threads: int, model_inputs: tuple[str, ...] = ()):
    if mode not in MODES:
      raise ValueError(f'torch mode {mode!r} not in {MODES}')
    self.build_model, self.variables, self.mode = build_model, variables, mode
    self.model_inputs = tuple(model_inputs)
    self.seed, self.channels_last, self.compile_mode, self.threads = seed, channels_last, compile_mode, threads
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')

  def configure(self) -> dict:
    """Process-wide torch settings for the measurements; returns them for the report."""
    info = {'device': str(self.device), 'channels_last': self.channels_last}
    if self.device.type == 'cpu':
      torch.set_num_threads(self.threads)
      info['threads'] = torch.get_num_threads()
    else:
      torch.backends.cudnn.benchmark = True
      torch.backends.cuda.matmul.allow_tf32 = True  # float32 as XLA's default precision on GPU: TF32
      torch.backends.cudnn.allow_tf32 = True
      info['device_name'] = torch.cuda.get_device_name()
    return info

  def sync(self):
    if self.device.type == 'cuda':
      torch.cuda.synchronize()

  def release_memory(self):
    """After an out-of-memory error: the caching allocator keeps the failed step's blocks otherwise."""
    if self.device.type == 'cuda':
      torch.cuda.empty_cache()

  def model(self, config):
    model = self.build_model(config, self.variables).to(self.device)
    if self.channels_last:
      model.to(memory_format=torch.channels_last)
    return model

  def inputs(self, fields: dict) -> dict:
    return {name: fields[name] for name in self.model_inputs}

  def logit_difference(self, config, batch: dict, want: dict) -> dict[str, float]:
    """Largest |torch - flax| eval logit on `batch` (numpy: 'video' and the model inputs), for the class logits
    ('logits') and each auxiliary output in `want` (flax's, by name): both frameworks hold the same weights."""
    model = self.model(config).eval()
    with torch.inference_mode():
      logits, aux = split_outputs(model(torch_input(torch.from_numpy(batch['video']).to(self.device),
                                                    self.channels_last),
                                        **self.inputs(torch_fields(batch, self.device))))
    differences = {}
    for name, got in {'logits': logits, **aux}.items():
      if name in want:
        got = got.cpu().numpy()  # equal infinities (a filtered class) agree
        differences[name] = float(np.where(got == want[name], 0.0, np.abs(got - want[name])).max())
    return differences

  def run(self, config, batch: dict, steps_flags: dict) -> dict:
    """Train and eval speed at one (dtype, batch size); `steps_flags` are benchmarking.time_windows'."""
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
    torch.manual_seed(self.seed)
    if self.mode == 'compile':
      torch._dynamo.reset()  # pylint: disable=protected-access
    model = self.model(config).train()
    optimizer = torch_optimizer(config.optimizer, model.parameters(), config.num_epochs)
    grad_clip_norm = config.optimizer.grad_clip_norm
    loss_fn = torch_batch_loss(config.loss)
    video = torch.from_numpy(batch['video']).to(self.device)
    fields = torch_fields(batch, self.device)  # labels and the model's other inputs (e.g. EST's permutation)
    labels = fields['label']
    batch_size = labels.shape[0]
    autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                 enabled=config.dtype == 'bfloat16')
    channels_last, inputs = self.channels_last, self.inputs

    def forward_loss(video, fields):
      with autocast():
        outputs = model(torch_input(video, channels_last), **inputs(fields))
      logits, aux = split_outputs(outputs)
      return loss_fn(logits, aux, fields).mean(), logits

    def predict(video, fields):
      with autocast():
        return split_outputs(model(torch_input(video, channels_last), **inputs(fields)))[0]

    if self.mode == 'compile':
      forward_loss = torch.compile(forward_loss, mode=self.compile_mode, dynamic=False)
      predict = torch.compile(predict, mode=self.compile_mode, dynamic=False)
    totals = {'loss_sum': torch.zeros((), device=self.device),
              'correct': torch.zeros((), dtype=torch.long, device=self.device)}

    def train_once():
      loss, logits = forward_loss(video, fields)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      if grad_clip_norm:  # optax.clip_by_global_norm, first in dferjax's chain
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
      optimizer.step()
      with torch.no_grad():  # the metrics dferjax's step accumulates on device
        totals['loss_sum'] += loss.detach() * batch_size
        totals['correct'] += (logits.argmax(-1) == labels).sum()

    if self.device.type == 'cuda':
      torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_once()  # compiles under torch.compile
    self.sync()
    first_step_s = time.perf_counter() - start
    flops_per_clip, extra_steps = None, 0
    if self.mode == 'eager':  # torch's own count of matmul/conv/attention FLOPs (forward + backward)
      with FlopCounterMode(display=False) as counter:
        train_once()
      flops_per_clip, extra_steps = counter.get_total_flops() / batch_size, 1
    timing = benchmarking.throughput(benchmarking.time_windows(train_once, self.sync, **steps_flags), batch_size)
    num_steps = 1 + extra_steps + steps_flags['warmup'] + steps_flags['steps']
    figures = {'train': {
        **timing, 'first_step_s': first_step_s,
        'compile_s': first_step_s - timing['step_time_s'] if self.mode == 'compile' else None,
        'matmul_conv_flops_per_clip': flops_per_clip,
        'peak_bytes_in_use': torch.cuda.max_memory_allocated() if self.device.type == 'cuda' else None,
        'mean_loss': float(totals['loss_sum']) / (num_steps * batch_size)}}

    model.eval()
    confusion = torch.zeros((config.num_classes,) * 2, dtype=torch.long, device=self.device)
    ones = torch.ones_like(labels)

    def eval_once():
      with torch.inference_mode():
        predicted = predict(video, fields).argmax(-1)  # dferjax's auxiliary heads' confusions are not mirrored
        confusion.index_put_((labels, predicted), ones, accumulate=True)

    start = time.perf_counter()
    eval_once()
    self.sync()
    eval_first_s = time.perf_counter() - start
    eval_timing = benchmarking.throughput(benchmarking.time_windows(eval_once, self.sync, **steps_flags),
                                          batch_size)
    figures['eval'] = {**eval_timing, 'first_step_s': eval_first_s,
                       'compile_s': eval_first_s - eval_timing['step_time_s'] if self.mode == 'compile' else None}
    del model, optimizer
    self.release_memory()
    return figures
