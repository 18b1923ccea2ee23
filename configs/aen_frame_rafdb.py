"""AEN's frame-level guide network on RAF-DB's aligned images, as the paper pre-trains it (Sec. 4.3).

    python -m dferjax.main --config configs/aen_frame_rafdb.py:root=data/RAF-DB/basic \
        --workdir runs/aen_frame_rafdb --config.init_from.backbone=weights/resnet18_ms1m

Reads two lists under `<root>`, `train.txt` and `test.txt`, with lines `<image name> <label>`: RAF-DB's
`EmoLabel/list_patition_label.txt` split by the `train_`/`test_` prefix, with `_aligned` added before `.jpg` (the
aligned images' names); AEN's own lists `<image path> 1 <label>` work too. Images are resolved against
`<root>/Image/aligned`. Arguments: root, labels ('raf_official': RAF-DB's 1..7; 'dfew': 0..6 in DFEW's
order, as AEN's lists), variant (as configs/aen_frame_dfew.py). Trains at 112 px, AEN's frame size, so the
squeeze's 784 values fit AEN; otherwise the recipe of configs/aen_frame_dfew.py (the prototype's 2D_pretrain.py).
"""
import ml_collections

from configs import aen_frame_dfew
from dferjax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, root='data/RAF-DB/basic', labels='raf_official', variant='paper')
  config = aen_frame_dfew.get_config(f'variant={args.variant}')
  with config.unlocked():
    config.dataset = ml_collections.ConfigDict(dict(
        name='image_list', data_dir='', train_split='train', eval_split='test', min_frames=0,
        image_lists={'train': f'{args.root}/train.txt', 'test': f'{args.root}/test.txt'},
        image_root=f'{args.root}/Image/aligned', label_order=args.labels))
    config.input.image_size = 112
  return config
