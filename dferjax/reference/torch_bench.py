"""The PyTorch side of scripts/bench_train.py: a model's transcription trained and evaluated eagerly or under
`torch.compile`, holding the flax initial weights, with dferjax's optimizer, loss and precision policy.

Apart from the script so that only its torch workers import torch. A model joins the benchmark with a builder
`(config, flax variables) -> torch.nn.Module` (its transcription with the weights copied in); the loop here is
model-neutral. Matching dferjax: SGD(momentum, weight_decay) = optax add_decayed_weights + sgd, the config's loss
on float32 logits, bf16 as AMP autocast, float32 with TF32 allowed on GPU (XLA's default precision there).
"""
import functools
import time
from typing import Any, Callable

import numpy as np
import torch

from dferjax import benchmarking, losses

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


def torch_loss(spec) -> Callable[[Any, Any], Any]:
  """`config.loss` as a per-example torch loss (logits, labels) -> [b]. Parsed by dferjax.losses.build_loss, so
  fields and defaults are dferjax's; only the losses of logits and labels alone have a transcription."""
  loss = losses.build_loss(spec)
  if isinstance(loss, losses.CompactLoss):
    return functools.partial(torch_compact_loss, beta=loss.beta)
  if isinstance(loss, losses.LabelSmoothing):  # optax.smooth_labels is torch's label_smoothing: (1 - a) y + a / C
    return functools.partial(torch.nn.functional.cross_entropy, reduction='none', label_smoothing=loss.smoothing)
  if isinstance(loss, losses.CrossEntropy):
    return functools.partial(torch.nn.functional.cross_entropy, reduction='none')
  raise ValueError(f'config.loss {dict(spec)} has no torch transcription in dferjax.reference.torch_bench')


def torch_input(video, channels_last: bool):
  """uint8 [b, t, h, w, 3] -> float [b, t, 3, h, w] in [0, 1]. The permuted view keeps NHWC memory, which is
  channels_last for the frames' convs once the model flattens (b, t); NCHW needs a copy."""
  video = video.permute(0, 1, 4, 2, 3).float() / 255
  return video if channels_last else video.contiguous()


class TorchBench:
  """One model's transcription on one device, `mode` 'eager' or 'compile', starting from the flax weights.

  build_model: (config, variables) -> the torch module holding `variables` (flax {'params', 'batch_stats'}).
  threads: intra-op threads on a CPU.
  """

  def __init__(self, build_model: Callable, variables: dict, mode: str, *, seed: int, channels_last: bool,
               compile_mode: str, threads: int):
    if mode not in MODES:
      raise ValueError(f'torch mode {mode!r} not in {MODES}')
    self.build_model, self.variables, self.mode = build_model, variables, mode
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

  def logit_difference(self, config, clips: np.ndarray, want: np.ndarray) -> float:
    """Largest |torch - flax| eval logit on `clips`: both frameworks hold the same weights."""
    model = self.model(config).eval()
    with torch.inference_mode():
      got = model(torch_input(torch.from_numpy(clips).to(self.device), self.channels_last)).float().cpu().numpy()
    return float(np.where(got == want, 0.0, np.abs(got - want)).max())  # equal infinities (a filtered class) agree

  def run(self, config, batch: dict, steps_flags: dict) -> dict:
    """Train and eval speed at one (dtype, batch size); `steps_flags` are benchmarking.time_windows'."""
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
    torch.manual_seed(self.seed)
    if self.mode == 'compile':
      torch._dynamo.reset()  # pylint: disable=protected-access
    model = self.model(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optimizer.learning_rate,
                                momentum=config.optimizer.momentum, weight_decay=config.optimizer.weight_decay)
    loss_fn = torch_loss(config.loss)
    video = torch.from_numpy(batch['video']).to(self.device)
    labels = torch.from_numpy(batch['label']).long().to(self.device)
    batch_size = labels.shape[0]
    autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                 enabled=config.dtype == 'bfloat16')
    channels_last = self.channels_last

    def forward_loss(video, labels):
      with autocast():
        logits = model(torch_input(video, channels_last))
      logits = logits.float()
      return loss_fn(logits, labels).mean(), logits

    def predict(video):
      with autocast():
        return model(torch_input(video, channels_last)).float()

    if self.mode == 'compile':
      forward_loss = torch.compile(forward_loss, mode=self.compile_mode, dynamic=False)
      predict = torch.compile(predict, mode=self.compile_mode, dynamic=False)
    totals = {'loss_sum': torch.zeros((), device=self.device),
              'correct': torch.zeros((), dtype=torch.long, device=self.device)}

    def train_once():
      loss, logits = forward_loss(video, labels)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
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
        predicted = predict(video).argmax(-1)
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
