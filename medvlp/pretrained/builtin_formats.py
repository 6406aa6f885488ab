"""Registers the built-in checkpoint formats (imported on the first :data:`FORMATS` lookup)."""
from __future__ import annotations

from medvlp.pretrained.biomedclip import BiomedCLIPFormat
from medvlp.pretrained.biovil import BioViLFormat
from medvlp.pretrained.formats import register_format
from medvlp.pretrained.gloria import GLoRIAFormat
from medvlp.pretrained.medclip import MedCLIPFormat
from medvlp.pretrained.mgca import ASGFormat, ConVIRTFormat, MGCAFormat

for _fmt in (MGCAFormat, ASGFormat, ConVIRTFormat, GLoRIAFormat, BiomedCLIPFormat, MedCLIPFormat, BioViLFormat):
    register_format(_fmt.name)(_fmt)
