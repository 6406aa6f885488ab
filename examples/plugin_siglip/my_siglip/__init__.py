"""SigLIP (Zhai et al. 2023) as a medvlp objective: the plugin tutorial's package."""
