"""Registers the built-in checkpoint formats (imported on the first :data:`FORMATS` lookup)."""
from __future__ import annotations

from medvlp.pretrained.biomedclip import BiomedCLIPFormat
from medvlp.pretrained.formats import register_format
from medvlp.pretrained.gloria import GLoRIAFormat
from medvlp.pretrained.mgca import ConVIRTFormat, MGCAFormat

for _fmt in (MGCAFormat, ConVIRTFormat, GLoRIAFormat, BiomedCLIPFormat):
    register_format(_fmt.name)(_fmt)
