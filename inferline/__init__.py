"""inferline's public API: the model contract users write against, importable without torch or tensorflow.

    from inferline import Model, Tensor

See service/model.py for the contract, and the README's "Serve your own model" for a complete example.
"""

from service import __version__
from service.errors import InputError
from service.model import CausalLM, LanguageModel, Model
from service.runtimes.keras_rt import keras_forward
from service.runtimes.torch_rt import place_module, torch_device, torch_forward
from service.tensors import Tensor

__all__ = ["CausalLM", "InputError", "LanguageModel", "Model", "Tensor", "__version__", "keras_forward",
           "place_module", "torch_device", "torch_forward"]
