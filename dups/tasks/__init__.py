"""What differs between pre-training and fine-tuning, each in a module of its own: the model,
its transforms, its loss, its evaluation and how a finished run hands its weights on. The
trainer and `dups eval` run either through the same few methods, without asking which."""
from __future__ import annotations

from dups.config import Config
from dups.tasks.classification import ClassificationTask
from dups.tasks.segmentation import SegmentationTask

TASKS = {"finetune": SegmentationTask, "pretrain": ClassificationTask}


def task_of(cfg: Config):
    """The run's task (``train.task``)."""
    return TASKS[cfg.train.task](cfg)


def build_model(cfg: Config):
    """The run's network with initial weights: a segmentor, or a classifier for pre-training."""
    return task_of(cfg).build_model()
