"""Datasets (MNIST, Fashion-MNIST, CIFAR-10/100, synthetic) and their grain input pipelines."""

from safe_dist.data.pipeline import apply_label_noise
from safe_dist.data.pipeline import crop_and_flip
from safe_dist.data.pipeline import eval_batches_of_arrays
from safe_dist.data.pipeline import make_eval_batches
from safe_dist.data.pipeline import make_train_iterator
from safe_dist.data.sources import DATASET_NAMES
from safe_dist.data.sources import DatasetInfo
from safe_dist.data.sources import DatasetNotFoundError
from safe_dist.data.sources import dataset_info
from safe_dist.data.sources import load_split
from safe_dist.data.sources import search_dirs
