"""DFEW (Jiang et al., ACM MM 2020) as a TFDS builder: 5-fold protocol, official single-label CSVs."""
from tfds_builders.dfew.dfew_dataset_builder import Dfew, read_split_csv

__all__ = ['Dfew', 'read_split_csv']
