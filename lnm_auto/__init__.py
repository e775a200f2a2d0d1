"""lnm_auto: self-configuring lymph node metastasis classification."""

__version__ = "0.1.0"
