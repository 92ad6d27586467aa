"""``m3embed train`` (the module moves into this package; see loop.py)."""

from m3embed.train.loop import *  # noqa: F403
from m3embed.train.loop import _optimizer  # noqa: F401
