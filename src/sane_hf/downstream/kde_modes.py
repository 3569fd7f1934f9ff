"""The KDE modes of SANE sampling (`sane_hf.downstream.sampling.draw_latents`).

A module of its own, without torch, so that the sampling settings and the CLI's ``--mode``
choices read the one list without importing the sampler.

- ``token``: every token around its own randomly chosen prompt, with its own noise;
- ``joint``: all tokens of a sample around one prompt, with noise per token;
- ``shared``: all tokens of a sample around one prompt, with one noise vector for all.
"""

from typing import Literal

KDEMode = Literal["token", "joint", "shared"]
KDE_MODES: tuple[str, ...] = ("token", "joint", "shared")

__all__ = ["KDE_MODES", "KDEMode"]
