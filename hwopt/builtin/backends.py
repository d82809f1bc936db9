"""Built-in plugin: the measurement backends torch, onnxruntime, tensorrt and roofline.

Each is registered ``Lazy``: its module (and torch, onnxruntime or
TensorRT with it) is imported only when a pass asks for backends, so that
``hwopt plugins`` and ``hwopt targets`` start at once.
"""

from hwopt.hookspecs import hookimpl
from hwopt.plugins import Lazy


@hookimpl
def hwopt_register_backends(register):
    register(Lazy("torch", "hwopt.builtin.backend_torch", "TorchBackend"))
    register(Lazy("onnxruntime", "hwopt.builtin.backend_onnxruntime", "OnnxRuntimeBackend"))
    register(Lazy("tensorrt", "hwopt.builtin.backend_tensorrt", "TensorRTBackend"))
    register(Lazy("roofline", "hwopt.builtin.backend_roofline", "RooflineBackend"))
