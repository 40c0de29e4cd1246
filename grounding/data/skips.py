"""What the readers leave out, and how it is counted.

Recoverable problems are skipped, never silently: a reader adds each one to a ``SkipReport`` (a count and
the first few examples per reason) and logs the report once the data is loaded. A training image found
unreadable in the middle of an epoch is skipped the same way (``UnreadableImage``, ``UnreadableImages``),
up to a limit past which the run stops with an error listing the files.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from grounding.data.images import ImageReadError

log = logging.getLogger(__name__)


@dataclass
class SkipReport:
    """What was left out of a dataset and why: counts and the first few ids per reason."""

    source: str
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, what: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(what)

    def log(self) -> None:
        for reason, count in sorted(self.counts.items()):
            log.warning("%s: skipped %d (%s), e.g. %s", self.source, count, reason, "; ".join(self.examples[reason]))


@dataclass(frozen=True)
class UnreadableImage:
    """A training sample whose image could not be read: the file, its image id and the reader's error.

    A dataset returns it in place of the sample (in a loader worker, which cannot count for the run); the
    collate function leaves it out of the batch and hands it on, and ``UnreadableImages`` counts it in the
    main process.
    """

    path: str
    image_id: object
    error: str

    def __str__(self) -> str:
        return f"{self.path} (image id {self.image_id}): {self.error}"


UNREADABLE = "unreadable image"
"""The reason under which a skipped training image is counted in the dataset's ``SkipReport``."""


class UnreadableImages:
    """The training images found unreadable so far, counted in the main process, with a limit.

    ``screen`` sees every training batch as the loader gives it out (``ResumableDataLoader``'s ``on_batch``):
    it takes the batch's ``"unreadable"`` entries out, counts each file once (an image met again in a later
    epoch is not a new one), adds it to ``report`` and logs a warning naming it with the running count. More
    than ``limit`` different files stop the run with an ``ImageReadError`` that lists them all.

    A batch whose every image was unreadable has nothing left to train on: in one process it is left out
    (``screen`` returns None); under several processes it is an error, because that process would take one
    step fewer than the others and leave them waiting.
    """

    def __init__(self, limit: int, report: SkipReport | None = None, num_processes: int = 1):
        self.limit = limit
        self.report = report if report is not None else SkipReport("training images")
        self.num_processes = num_processes
        self.files: dict[str, UnreadableImage] = {}

    def __len__(self) -> int:
        return len(self.files)

    def add(self, images: list[UnreadableImage]) -> None:
        """Count the files not seen before; an error listing every one once there are more than ``limit``."""
        for image in images:
            if image.path in self.files:
                continue
            self.files[image.path] = image
            self.report.add(UNREADABLE, f"image id {image.image_id}: {image.path}")
            log.warning("%s: skipped unreadable training image %d (at most %d): %s",
                        self.report.source, len(self.files), self.limit, image)
        if len(self.files) > self.limit:
            listing = "\n".join(f"  {image}" for image in self.files.values())
            raise ImageReadError(
                f"training images that could not be read: {len(self.files)}, more than data.max_bad_images={self.limit}"
                f" allows:\n{listing}"
            )

    def screen(self, batch: dict) -> dict | None:
        """The batch without its ``"unreadable"`` entry (counted); None when no image of it was readable."""
        unreadable = batch.pop("unreadable", None)
        if not unreadable:
            return batch
        self.add(unreadable)
        if "pixel_values" in batch:
            return batch
        if self.num_processes > 1:
            raise ImageReadError(
                "every image of a training batch could not be read, and with "
                f"{self.num_processes} processes the batch cannot be left out (the processes would fall out of"
                " step): " + "; ".join(str(image) for image in unreadable)
            )
        return None
