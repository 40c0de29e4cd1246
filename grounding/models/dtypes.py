"""The dtypes a model's weights may be given in a setting, by name (``float32``, ``bfloat16``, ``float16``)."""

from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: DtypeName) -> torch.dtype:
    """The torch dtype of a ``DtypeName``; another name is a ValueError listing the choices."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
