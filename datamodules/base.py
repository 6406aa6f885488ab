"""``VLPDataModule``: the base of every datamodule; owns datasets, loaders and the one collate."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from medvlp.batch import collate
from medvlp.datamodules.io.readers import DataError
from importlib import resources
import yaml

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
POLICIES = ("fail", "skip")


MAX_FIRST_ERRORS = 3


class SkippingDataset(Dataset):
    """A dataset with the ``on_error`` policy for unreadable samples.

    Subclasses implement :meth:`read` (raise :class:`DataError` naming the file). With ``on_error="fail"``
    the error propagates. With ``"skip"`` an unreadable sample returns ``None`` and is flagged in a
    shared-memory table (visible to the main process and every DataLoader worker), so each bad file is
    logged and counted once per run, not once per epoch or per worker; later reads of it are not retried.
    Training loaders wrap the dataset in :class:`ReplaceSkipped` so batches keep their size.

    Raises:
        DataError: when more than ``max_skip_fraction`` of the samples turned out unreadable, naming the
            count and the first errors.
    """

    max_skip_fraction: float = 0.5

    def __init__(self, size: int, on_error: str, name: str) -> None:
        if on_error not in POLICIES:
            raise ValueError(f"on_error must be one of {POLICIES}, got {on_error!r}")
        self.on_error, self.name = on_error, name
        self.bad = torch.zeros(size, dtype=torch.bool).share_memory_()
        self.first_errors: list[str] = []

    def read(self, i: int) -> dict[str, Any]:
        """Sample ``i``; raise :class:`DataError` when it cannot be read."""
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """Distinct samples found unreadable so far (all processes)."""
        return int(self.bad.sum())

    def __len__(self) -> int:
        return len(self.bad)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        if self.on_error == "skip" and self.bad[i]:
            return None
        try:
            return self.read(i)
        except DataError as exc:
            if self.on_error == "fail":
                raise
            self._flag(i, exc)
            return None

    def _flag(self, i: int, exc: DataError) -> None:
        if not self.bad[i]:
            self.bad[i] = True
            if len(self.first_errors) < MAX_FIRST_ERRORS:
                self.first_errors.append(str(exc))
            log.warning("%s: skipped sample %d (logged once): %s", self.name, i, exc)
        n_bad, n = self.skipped, len(self)
        if n_bad > self.max_skip_fraction * n:
            raise DataError(
                f"{self.name}: {n_bad} of {n} samples are unreadable, more than max_skip_fraction="
                f"{self.max_skip_fraction} under on_error=skip; first errors: {'; '.join(self.first_errors)}")


class ReplaceSkipped(Dataset):
    """Training view of a :class:`SkippingDataset`: a skipped sample is replaced by the next readable
    one (cyclically), so every batch on every rank keeps its size (no short batch for BatchNorm or
    Barlow Twins, no rank with fewer samples under DDP). The replacement repeats a sample within the
    epoch; the skip is still counted once.

    Raises:
        DataError: when no sample of the dataset can be read, naming the count and the first errors.
    """

    def __init__(self, dataset: SkippingDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.dataset)
        for k in range(n):
            sample = self.dataset[(i + k) % n]
            if sample is not None:
                return sample
        raise DataError(f"{self.dataset.name}: none of the {n} samples is readable under on_error=skip; "
                        f"first errors: {'; '.join(self.dataset.first_errors)}")


class RecordDataset(SkippingDataset):
    """Dataset over records with a per-sample failure policy (see :class:`SkippingDataset`)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], load: Callable[[Mapping[str, Any]], dict],
                 on_error: str, name: str) -> None:
        super().__init__(len(records), on_error, name)
        self.records, self.load = list(records), load

    def read(self, i: int) -> dict[str, Any]:
        sample = self.load(self.records[i])
        sample.setdefault("index", i)
        return sample


class VLPDataModule(L.LightningDataModule):
    """Base datamodule producing batches in the :mod:`medvlp.batch` schema.

    Subclasses implement :meth:`build_dataset` and may override :meth:`encoder_hints`,
    :attr:`label_names` and :meth:`class_prompts`.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        pin_memory: pin host memory (GPU training).
        persistent_workers: keep workers alive between epochs.
        max_skip_fraction: under ``on_error: skip``, stop with a :class:`DataError` once more than this
            share of a split's samples is unreadable (see :class:`SkippingDataset`).
    """

    name = "base"
    modality = "xray"
    #: collate function of every loader (datamodules with a skip policy drop ``None`` samples)
    collate_fn = staticmethod(collate)

    def __init__(self, batch_size: int = 16, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, max_skip_fraction: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.max_skip_fraction = max_skip_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self._datasets: dict[str, Dataset] = {}
        self.skipped: Counter[str] = Counter()

    # subclasses ---------------------------------------------------------------------------
    def build_dataset(self, split: str, augment: bool) -> Dataset:
        """Return the dataset of ``split`` ∈ {train, val, test}; random augmentation only if ``augment``."""
        raise NotImplementedError

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return 2

    @property
    def dataset_version(self) -> str:
        """Version tag recorded with every result row (release, generator version …)."""
        return "unversioned"

    @property
    def label_names(self) -> list[str]:
        """Class names of ``labels`` (empty when the dataset has none)."""
        return []

    def prompt_file(self) -> dict[str, dict[str, list[str]]]:
        """Packaged prompts ``datamodules/prompts/<name>.yaml`` (``{class: {positive, negative}}``), or {}."""


        ref = resources.files("medvlp.datamodules").joinpath("prompts", f"{self.name}.yaml")
        return yaml.safe_load(ref.read_text()) if ref.is_file() else {}

    def class_prompts(self) -> dict[str, list[str]]:
        """Zero-shot prompts per class (positive phrasing): the packaged prompt file, else templates."""
        packaged = self.prompt_file()
        return {name: list(packaged[name]["positive"]) if name in packaged else
                [f"There is {name.lower()}.", f"Findings consistent with {name.lower()}."] for name in self.label_names}

    def negative_prompts(self) -> dict[str, list[str]]:
        """Negated prompts per class; zero-shot scores cos(positive) − cos(negated) per class."""
        packaged = self.prompt_file()
        return {name: list(packaged[name]["negative"]) if name in packaged else
                [f"There is no {name.lower()}.", f"No {name.lower()}."] for name in self.label_names}

    def encoder_hints(self) -> dict[str, Any]:
        """Image-encoder settings implied by the data (``spatial_dims``, sizes); unset keys are filled."""
        return {}

    def method_hints(self) -> dict[str, Any]:
        """Method arguments implied by the data, filled when the method accepts them and they are unset."""
        return {"class_names": self.label_names} if self.label_names else {}

    def skip_report(self) -> dict[str, int]:
        """Samples skipped so far under the datamodule's policy, per dataset (index-time and load-time).

        Load-time counts are distinct unreadable samples, shared with DataLoader workers (each bad file
        counts once per run, whatever the number of epochs or workers).

        Returns:
            ``{key: count}`` with keys ``<split>`` (``train``, ``val``, ``test``) for a split as loaded for
            evaluation, ``<split>+aug`` for a split as loaded with training augmentation (``train+aug``:
            the pretraining stream), and ``index:<reason>`` for records dropped while building the index
            (e.g. ``index:empty_report``). ``<run>/summary.json`` stores it under ``skipped``.
        """
        out: dict[str, int] = {}
        for key, ds in self._datasets.items():
            n = ds.skipped if isinstance(getattr(ds, "skipped", None), int) else sum(getattr(ds, "skipped", {}).values())
            if n:
                out[key] = int(n)
        index = getattr(self, "index_skips", None)
        if index:
            out.update({f"index:{k}": int(v) for k, v in index.items()})
        return out

    # loaders ------------------------------------------------------------------------------
    def dataset(self, split: str, augment: bool | None = None) -> Dataset:
        """The (cached) dataset of ``split``; augmented by default only for ``train``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        augment = split == "train" if augment is None else augment
        key = f"{split}{'+aug' if augment else ''}"
        if key not in self._datasets:
            ds = self.build_dataset(split, augment)
            if isinstance(ds, SkippingDataset):
                ds.max_skip_fraction = getattr(self, "max_skip_fraction", SkippingDataset.max_skip_fraction)
            self._datasets[key] = ds
        return self._datasets[key]

    def _loader(self, split: str, shuffle: bool, drop_last: bool = False) -> DataLoader:
        ds = self.dataset(split)
        if isinstance(ds, SkippingDataset) and ds.on_error == "skip":
            ds = ReplaceSkipped(ds)  # type: ignore[assignment]  # training/validation batches keep their size
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=self.collate_fn, pin_memory=self.pin_memory, drop_last=drop_last,
                          persistent_workers=self.persistent_workers,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        # contrastive losses need ≥2 samples and BatchNorm heads need full batches
        return self._loader("train", shuffle=True, drop_last=len(self.dataset("train")) > self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.dataset("val")) == 0:  # type: ignore[arg-type]
            return []  # no validation data: Lightning skips validation
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def eval_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Deterministic, non-augmented loader for feature extraction."""
        return DataLoader(self.dataset(split, augment=False), batch_size=batch_size or self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=self.collate_fn, pin_memory=self.pin_memory)
