"""Built-in pretraining objectives (importing this registers them)."""
from medvlp.methods.asg import ASG
from medvlp.methods.clip import CLIP

__all__ = ["ASG", "CLIP"]
