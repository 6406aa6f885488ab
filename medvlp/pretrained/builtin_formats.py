"""Registers the built-in checkpoint formats (imported on the first :data:`FORMATS` lookup)."""
from __future__ import annotations

from medvlp.pretrained.biomedclip import BiomedCLIPFormat
from medvlp.pretrained.formats import register_format
from medvlp.pretrained.mgca import MGCAFormat

for _fmt in (MGCAFormat, BiomedCLIPFormat):
    register_format(_fmt.name)(_fmt)
