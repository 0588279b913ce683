"""A run's data by its `DataConfig`, images and text alike: sizes, the train stream, eval batches.

The trainer and the evaluation call these; they dispatch to the image pipelines
(`pipeline`, `sources`) or to the token windows of a text corpus (`text`).
"""

from safe_dist.data import pipeline
from safe_dist.data import sources
from safe_dist.data import text


def is_text(name: str) -> bool:
  return name in text.CORPUS_NAMES


def info(cfg) -> sources.DatasetInfo:
  if is_text(cfg.name):
    return text.text_info(cfg.name, cfg.tokenizer, cfg.seqlen)
  return sources.dataset_info(cfg.name, cfg.data_dir)


def eval_split(cfg) -> str:
  """The split every evaluation of the run uses: "validation" (the held-out training examples)
  with `validation_examples` > 0, else "test"."""
  return "validation" if cfg.validation_examples else "test"


def split_size(cfg, dataset: sources.DatasetInfo, split: str) -> int:
  """Examples of a split of `pipeline.EVAL_SPLITS` (before any max_*_examples slice); a
  `validation_examples` that leaves no training example is refused here, by its flag."""
  if cfg.validation_examples:
    pipeline.check_validation_examples(dataset.num_train, cfg.validation_examples)
  return {"train": dataset.num_train - cfg.validation_examples,
          "validation": cfg.validation_examples, "test": dataset.num_test}[split]


def train_iterator(cfg, *, global_batch_size: int, seed: int, for_statistics: bool = False,
                   process_index: int = 0, process_count: int = 1):
  """This process's infinite stream of training batches (get_state/set_state).

  for_statistics: no augmentation and clean labels (BatchNorm re-estimation). The
  `validation_examples` held-out examples are never in it.
  """
  if is_text(cfg.name):
    return text.make_train_iterator(
        cfg.name, tokenizer=cfg.tokenizer, seqlen=cfg.seqlen, global_batch_size=global_batch_size,
        seed=seed, max_examples=cfg.max_train_examples, process_index=process_index,
        process_count=process_count)
  return pipeline.make_train_iterator(
      cfg.name, global_batch_size=global_batch_size, seed=seed, data_dir=cfg.data_dir,
      label_noise_ratio=0.0 if for_statistics else cfg.label_noise_ratio,
      augment=cfg.augment and not for_statistics, max_examples=cfg.max_train_examples,
      validation_examples=cfg.validation_examples, process_index=process_index,
      process_count=process_count)


def eval_batches(cfg, *, batch_size: int, split: str = "test", process_index: int = 0,
                 process_count: int = 1):
  """This process's rows of padded global batches over the first `max_eval_examples`
  examples of `split` ("train", "validation" or "test"; see `eval_split`)."""
  if is_text(cfg.name):
    return text.make_eval_batches(
        cfg.name, tokenizer=cfg.tokenizer, seqlen=cfg.seqlen, batch_size=batch_size,
        split=split, max_examples=cfg.max_eval_examples, process_index=process_index,
        process_count=process_count)
  return pipeline.make_eval_batches(
      cfg.name, batch_size=batch_size, split=split, data_dir=cfg.data_dir,
      max_examples=cfg.max_eval_examples, validation_examples=cfg.validation_examples,
      process_index=process_index, process_count=process_count)
