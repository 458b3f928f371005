"""What the handler's stages pass on: kept out of bookrec_handler.py, where TorchServe accepts one class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from handlers.engine import Result
from handlers.schema import Refusal, Request


@dataclass
class Batch:
    """One TorchServe batch between the stages: the bodies, then what validation and scoring made of them."""

    bodies: list[Any]
    parsed: list[Request | Refusal]  # preprocess: a validated request, or the 4xx/500 refusing it
    results: list[Result] = field(default_factory=list)  # inference: (HTTP status, JSON body) per request
