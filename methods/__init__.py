"""Built-in pretraining objectives (importing this registers them)."""
from medvlp.methods.asg import ASG
from medvlp.methods.clip import CLIP
from medvlp.methods.gtgm import GTGM
from medvlp.methods.umcl import UMCL
from medvlp.methods.unimedi import UniMedI

__all__ = ["ASG", "CLIP", "GTGM", "UMCL", "UniMedI"]
