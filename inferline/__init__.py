"""inferline's public API: the model contract users write against, importable without torch or tensorflow.

    from inferline import Model, Tensor

See server/model.py for the contract, and the README's "Serve your own model" for a complete example.
"""

from inferline.server import __version__
from inferline.server.errors import InputError
from inferline.server.model import CausalLM, LanguageModel, Model
from inferline.server.runtimes.keras_rt import keras_forward
from inferline.server.runtimes.torch_rt import place_module, torch_device, torch_forward
from inferline.server.tensors import Tensor

__all__ = ["CausalLM", "InputError", "LanguageModel", "Model", "Tensor", "__version__", "keras_forward",
           "place_module", "torch_device", "torch_forward"]
