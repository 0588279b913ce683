"""Datasets (MNIST, Fashion-MNIST, CIFAR-10/100, synthetic), text corpora (Shakespeare) and
their grain input pipelines; `streams` serves a run's `DataConfig` whichever it is."""

from safe_dist.data.pipeline import apply_label_noise
from safe_dist.data.pipeline import crop_and_flip
from safe_dist.data.pipeline import eval_batches_of_arrays
from safe_dist.data.pipeline import make_eval_batches
from safe_dist.data.pipeline import make_train_iterator
from safe_dist.data.pipeline import split_arrays
from safe_dist.data.pipeline import validation_split
from safe_dist.data.sources import DATASET_NAMES
from safe_dist.data.sources import DatasetInfo
from safe_dist.data.sources import DatasetNotFoundError
from safe_dist.data.sources import dataset_info
from safe_dist.data.sources import load_split
from safe_dist.data.sources import search_dirs
from safe_dist.data.streams import eval_batches
from safe_dist.data.streams import eval_split
from safe_dist.data.streams import info
from safe_dist.data.streams import is_text
from safe_dist.data.streams import split_size
from safe_dist.data.streams import train_iterator
from safe_dist.data.text import CORPUS_NAMES
