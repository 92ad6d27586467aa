"""m3embed: BGE-M3-style embedding models (dense + sparse + ColBERT) trained with huge batches on little memory."""

from m3embed.model import M3Config, M3Model
from m3embed.reps import M3Reps
from m3embed.step import train_step

__all__ = ["M3Config", "M3Model", "M3Reps", "train_step"]
__version__ = "0.1.0"
