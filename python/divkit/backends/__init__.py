"""divkit's engines other than the C++ core: :mod:`divkit.backends.torch_ops`, the device-generic
PyTorch fallback (any device PyTorch runs on), chosen by :mod:`divkit._device`."""
