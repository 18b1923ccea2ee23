"""AFEW 7.0/8.0 (EmotiW) as a TFDS builder: Train_AFEW -> train, Val_AFEW -> validation."""
from tfds_builders.afew.afew_dataset_builder import Afew

__all__ = ['Afew']
