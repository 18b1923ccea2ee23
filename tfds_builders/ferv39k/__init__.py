"""FERV39K (Wang et al., CVPR 2022) as a TFDS builder: the All_scenes train/test setup."""
from tfds_builders.ferv39k.ferv39k_dataset_builder import Ferv39k

__all__ = ['Ferv39k']
