"""lnm_auto: self-configuring lymph node metastasis classification."""
import warnings

__version__ = "0.1.0"

# timm (and torchvision) declare TorchScript interfaces when imported, which torch >= 2.14 deprecates: a
# FutureWarning on every command that builds a network, about nothing lnm_auto or its users do. Only that exact
# message is silenced.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
