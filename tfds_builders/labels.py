"""The one label schema of every builder, dataset reader, report and test.

A leaf module (no tensorflow_datasets, no dferjax): the trainer and the tests import it without paying for TFDS,
and the builders use it without importing `dferjax.data`, which imports them back.

CLASS_NAMES[i] is label i: DFEW's official labels 1..7 minus one (refs.md §2.5), and the order of the
`tfds.features.ClassLabel` in every built dataset. Changing it relabels datasets already built.
"""

CLASS_NAMES = ('happy', 'sad', 'neutral', 'angry', 'surprise', 'disgust', 'fear')
NUM_CLASSES = len(CLASS_NAMES)
